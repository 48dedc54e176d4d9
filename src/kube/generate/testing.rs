//! Fixtures shared by the generators' tests: a mesh of five peers as
//! meshd's API reports it, and readers for the YAML the generators print.

use std::collections::BTreeMap;

use serde::Deserialize as _;
use serde_norway::Value;

use super::{Local, Mesh, Overrides};
use crate::control::{CandidateInfo, CandidateSource, PeerInfo, StatusInfo};

pub(super) const KEY_B: &str = "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08=";

pub(super) fn status() -> StatusInfo {
    StatusInfo {
        name: Some("node-a".into()),
        public_key: "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
            .parse()
            .unwrap(),
        overlay_ips: vec![
            "100.72.0.5".parse().unwrap(),
            "fd7a:1:2::5".parse().unwrap(),
        ],
        interface: "mesh0".into(),
        listen_port: 51820,
        addresses: vec![
            "100.72.0.5/16".parse().unwrap(),
            "fd7a:1:2::5/48".parse().unwrap(),
        ],
        seen_at: vec![
            "198.51.100.9:40000 (node-b)".parse().unwrap(),
            "203.0.113.5:51820 (rendezvous)".parse().unwrap(),
        ],
        ..StatusInfo::default()
    }
}

pub(super) fn candidate(endpoint: &str, source: CandidateSource) -> CandidateInfo {
    CandidateInfo {
        endpoint: endpoint.parse().unwrap(),
        source,
        alive: true,
        rtt_ms: None,
        probes_sent: 0,
        probes_answered: 0,
    }
}

pub(super) fn peer(name: Option<&str>, ips: &[&str], candidates: Vec<CandidateInfo>) -> PeerInfo {
    PeerInfo {
        name: name.map(Into::into),
        public_key: KEY_B.parse().unwrap(),
        overlay_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
        candidates,
        ..PeerInfo::default()
    }
}

pub(super) fn peers() -> Vec<PeerInfo> {
    vec![
        peer(
            Some("node-b"),
            &["100.72.0.6", "fd7a:1:2::6"],
            vec![
                candidate("10.0.0.6:51820", CandidateSource::Local),
                candidate("198.51.100.6:51820", CandidateSource::Observed),
                candidate("[2001:db8::6]:51820", CandidateSource::Advertised),
                candidate("192.0.2.6:51820", CandidateSource::Advertised),
            ],
        ),
        peer(
            Some("node-c"),
            &["100.72.0.7", "fd7a:1:2::7"],
            vec![
                candidate("10.1.0.7:51820", CandidateSource::Local),
                candidate("198.51.100.7:3000", CandidateSource::Observed),
            ],
        ),
        peer(
            Some("node-d"),
            &["100.72.0.8", "fd7a:1:2::8"],
            vec![candidate("10.2.0.8:51820", CandidateSource::Local)],
        ),
        peer(Some("node-e"), &["100.72.0.9", "fd7a:1:2::9"], vec![]),
        peer(
            None,
            &["100.72.0.10"],
            vec![candidate("192.0.2.10:51820", CandidateSource::Advertised)],
        ),
    ]
}

pub(super) fn mesh() -> Mesh {
    Mesh::from_api(&status(), &peers(), &Overrides::default()).unwrap()
}

pub(super) fn local() -> Local {
    mesh().local
}

/// The YAML documents after the leading comments.
pub(super) fn documents(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap())
        .collect()
}

pub(super) fn document(text: &str) -> Value {
    let mut docs = documents(text);
    assert_eq!(docs.len(), 1, "{text}");
    docs.remove(0)
}

pub(super) fn str_at<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    let mut at = v;
    for key in path {
        at = &at[*key];
    }
    at.as_str()
        .unwrap_or_else(|| panic!("{path:?} is not a string: {at:?}"))
}

pub(super) fn args(list: &Value) -> BTreeMap<String, String> {
    list.as_sequence()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap().to_owned(),
                a["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The JSON of the `-p '…'` argument on the comment line containing
/// `command`.
pub(super) fn patch_argument(text: &str, command: &str) -> serde_json::Value {
    let line = text
        .lines()
        .find(|l| l.starts_with('#') && l.contains(command))
        .unwrap_or_else(|| panic!("no {command:?} line:\n{text}"));
    let quoted = line.split(" -p ").nth(1).unwrap();
    serde_json::from_str(quoted.trim().trim_matches('\'')).unwrap()
}
