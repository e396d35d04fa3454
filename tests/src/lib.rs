//! CSI conformance suite and csi-bench for rcsi drivers.
