//! Kubernetes integration: what a node tells kubelet and the CNI about its
//! overlay address.
//!
//! [`env`] renders (pure) and writes (file I/O) the environment file that
//! kubelet's drop-in reads; [`generate`] builds the configuration that
//! `meshctl kube …` prints.

pub mod env;
pub mod flannel;
pub mod generate;
