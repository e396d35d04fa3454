"""Talks to an rcsi driver with Python grpcio at its default settings.

grpcio sends the percent-encoded socket path as the HTTP/2 :authority; this
checks that every call still gets a real answer. Usage:
  grpcio_client.py STUBS_DIR CSI_SOCKET [REGISTRATION_SOCKET]
Prints one line per call and exits non-zero on the first failure.
"""
import sys

sys.path.insert(0, sys.argv[1])
import grpc  # noqa: E402
import csi_pb2  # noqa: E402
import csi_pb2_grpc  # noqa: E402

csi_sock, reg_sock = sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else None)

channel = grpc.insecure_channel("unix:" + csi_sock)
identity = csi_pb2_grpc.IdentityStub(channel)
controller = csi_pb2_grpc.ControllerStub(channel)

info = identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10)
print("GetPluginInfo", info.name)
assert info.name == "local.rcsi.io", info

probe = identity.Probe(csi_pb2.ProbeRequest(), timeout=10)
print("Probe", probe.ready.value)

cap = csi_pb2.VolumeCapability(
    mount=csi_pb2.VolumeCapability.MountVolume(),
    access_mode=csi_pb2.VolumeCapability.AccessMode(
        mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
    ),
)
vol = controller.CreateVolume(
    csi_pb2.CreateVolumeRequest(
        name="grpcio-interop",
        capacity_range=csi_pb2.CapacityRange(required_bytes=1 << 20),
        volume_capabilities=[cap],
    ),
    timeout=10,
).volume
print("CreateVolume", vol.volume_id, vol.capacity_bytes)
assert vol.volume_id and vol.capacity_bytes >= 1 << 20, vol

listed = controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=10)
assert [e.volume.volume_id for e in listed.entries] == [vol.volume_id], listed
print("ListVolumes", len(listed.entries))

# A spec error still arrives as its own code, not as a reset stream.
try:
    controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(), timeout=10)
    raise SystemExit("DeleteVolume without an id succeeded")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
    print("DeleteVolume(no id)", e.code().name)

controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=10)
print("DeleteVolume ok")

if reg_sock:
    import pluginregistration_pb2 as reg_pb2
    import pluginregistration_pb2_grpc as reg_grpc

    reg = reg_grpc.RegistrationStub(grpc.insecure_channel("unix:" + reg_sock))
    got = reg.GetInfo(reg_pb2.InfoRequest(), timeout=10)
    print("GetInfo", got.type, got.name, got.endpoint)
    assert got.type == "CSIPlugin" and got.name == "local.rcsi.io", got
    reg.NotifyRegistrationStatus(
        reg_pb2.RegistrationStatus(plugin_registered=True), timeout=10
    )
    print("NotifyRegistrationStatus ok")
print("all calls answered")
