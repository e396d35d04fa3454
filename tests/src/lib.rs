//! CSI conformance suite and csi-bench for rcsi drivers.
//!
//! The suite talks to a driver over its real socket, as the kubelet and the
//! provisioner do, with real mounts and devices. Which cases run follows the
//! capabilities the driver advertises, so the same suite serves every driver.

pub mod backend;
pub mod cases;
pub mod flows;
pub mod harness;
pub mod raw;

pub use backend::Backend;
pub use harness::{
    CommandDriver, Ctx, Driver, Instance, LoopFs, Profile, node_vm_trial, run_suite,
    run_suite_with, writer,
};
