//! The Ceph layer shared by `rbd.rcsi.io` and `cephfs.rcsi.io`: which
//! monitors a `clusterID` names ([`config`]), the cephx credentials a call
//! carries ([`secret`]), the volume ids ([`id`]) and a librados connection
//! ([`rados`]).

pub mod config;
pub mod error;
pub mod id;
pub mod rados;
pub mod secret;

pub use error::CephError;
