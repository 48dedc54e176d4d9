//! A strategic-merge patch of one container of a DaemonSet, the shape the
//! flannel and calico-manifest generators print. Pure.

use serde::{Deserialize, Serialize};

/// A strategic-merge patch of one container of a DaemonSet. Containers
/// merge by name and `env` by variable name; `args` is a plain list and is
/// replaced whole.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct DaemonSetPatch {
    spec: DaemonSetSpec,
}

#[derive(Debug, Serialize, Deserialize)]
struct DaemonSetSpec {
    template: PodTemplate,
}

#[derive(Debug, Serialize, Deserialize)]
struct PodTemplate {
    spec: PodSpec,
}

#[derive(Debug, Serialize, Deserialize)]
struct PodSpec {
    containers: Vec<Container>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Container {
    pub(super) name: String,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub(super) args: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub(super) env: Vec<EnvVar>,
    /// A probe merges into the container's as a map; its `command` list
    /// is replaced whole.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(super) liveness_probe: Option<ExecProbe>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(super) readiness_probe: Option<ExecProbe>,
}

/// A probe that runs a command in the container.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ExecProbe {
    exec: ExecAction,
}

#[derive(Debug, Serialize, Deserialize)]
struct ExecAction {
    command: Vec<String>,
}

impl ExecProbe {
    pub(super) fn new(command: &[&str]) -> Self {
        Self {
            exec: ExecAction {
                command: command.iter().map(|&c| c.to_owned()).collect(),
            },
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct EnvVar {
    name: String,
    value: String,
}

impl EnvVar {
    pub(super) fn new(name: &str, value: impl ToString) -> Self {
        Self {
            name: name.to_owned(),
            value: value.to_string(),
        }
    }
}

pub(super) fn daemonset_patch(container: Container) -> DaemonSetPatch {
    DaemonSetPatch {
        spec: DaemonSetSpec {
            template: PodTemplate {
                spec: PodSpec {
                    containers: vec![container],
                },
            },
        },
    }
}
