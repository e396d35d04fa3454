//! The Ceph layer shared by `rbd.rcsi.io` and `cephfs.rcsi.io`: which
//! monitors a `clusterID` names ([`config`]), the cephx credentials a call
//! carries ([`secret`]), the volume ids ([`id`]), librados and librbd
//! loaded at run time ([`ffi`]), a librados connection ([`rados`]) pooled
//! per cluster and user ([`pool`]), the name→id journal in RADOS omaps
//! ([`journal`]), the librbd calls ([`librbd`]), and the RBD driver
//! ([`rbd`]).

pub mod cephfs;
pub mod config;
pub mod error;
pub mod ffi;
pub mod id;
pub mod journal;
mod keyfiles;
pub mod librbd;
pub mod pool;
pub mod rados;
pub mod rbd;
pub mod secret;
mod volstate;

pub use error::CephError;
