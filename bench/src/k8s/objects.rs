//! The objects `rbench k8s` creates, all labelled with the run's id so
//! they can be found and removed again.

use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod, Secret};
use serde_json::json;

/// Label every object of a run carries (value: the run's id).
pub const RUN_LABEL: &str = "rbench.rcsi.io/run";

/// Port the services listen on inside their pods.
pub const SERVICE_PORT: u16 = 1611;

/// Device path of a Block volume in the pod.
pub const DEVICE_PATH: &str = "/dev/rbench";

/// What one run asks for.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The id of the claims and pods of this StorageClass (their label).
    pub run: String,
    /// Name of the Secret holding the services' shared secret (one per run).
    pub secret_name: String,
    /// StorageClass of the claims.
    pub storage_class: String,
    /// Requested size (a Kubernetes quantity).
    pub size: String,
    /// `ReadWriteOnce`, `ReadWriteMany`, ...
    pub access_mode: String,
    /// Block volumes instead of filesystems.
    pub block: bool,
    /// The image holding `rbench`.
    pub image: String,
    /// Spread the pods over nodes (preferred anti-affinity).
    pub spread: bool,
    /// Where a Filesystem volume is mounted in the pods.
    pub mount_path: String,
}

impl Spec {
    /// The path the services work on.
    pub fn target(&self) -> &str {
        if self.block {
            DEVICE_PATH
        } else {
            &self.mount_path
        }
    }

    fn labels(&self) -> serde_json::Value {
        json!({"app.kubernetes.io/name": "rbench", RUN_LABEL: self.run})
    }

    /// A namespace of the run.
    pub fn namespace(&self, name: &str) -> Namespace {
        from(json!({"metadata": {"name": name, "labels": self.labels()}}))
    }

    /// The Secret with the shared secret.
    pub fn secret(&self, secret: &str) -> Secret {
        from(json!({
            "metadata": {"name": self.secret_name, "labels": self.labels()},
            "type": "Opaque",
            "stringData": {"secret": secret},
        }))
    }

    /// Claim `name`.
    pub fn claim(&self, name: &str) -> PersistentVolumeClaim {
        from(json!({
            "metadata": {"name": name, "labels": self.labels()},
            "spec": {
                "storageClassName": self.storage_class,
                "accessModes": [self.access_mode],
                "volumeMode": if self.block { "Block" } else { "Filesystem" },
                "resources": {"requests": {"storage": self.size}},
            },
        }))
    }

    /// Pod `name` serving `rbench --service` on claim `name`.
    pub fn pod(&self, name: &str) -> Pod {
        let mut container = json!({
            "name": "rbench",
            "image": self.image,
            "command": ["rbench", "--service", "--bind", "0.0.0.0",
                        "--port", SERVICE_PORT.to_string(), self.target()],
            "env": [{"name": "RBENCH_SECRET",
                     "valueFrom": {"secretKeyRef": {"name": self.secret_name, "key": "secret"}}}],
            "ports": [{"name": "rbench", "containerPort": SERVICE_PORT}],
        });
        if self.block {
            container["volumeDevices"] = json!([{"name": "data", "devicePath": DEVICE_PATH}]);
        } else {
            container["volumeMounts"] = json!([{"name": "data", "mountPath": self.mount_path}]);
        }
        let mut spec = json!({
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 1,
            "containers": [container],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": name}}],
        });
        if self.spread {
            spec["affinity"] = json!({"podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [{
                    "weight": 100,
                    "podAffinityTerm": {
                        "labelSelector": {"matchLabels": {RUN_LABEL: self.run}},
                        "topologyKey": "kubernetes.io/hostname",
                    },
                }],
            }});
        }
        from(json!({"metadata": {"name": name, "labels": self.labels()}, "spec": spec}))
    }
}

/// A typed object from its JSON (the shapes above are fixed and valid).
fn from<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).expect("a valid object")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(block: bool, spread: bool) -> Spec {
        Spec {
            run: "abc123".into(),
            secret_name: "rbench-abc123".into(),
            storage_class: "fast".into(),
            size: "10Gi".into(),
            access_mode: "ReadWriteOnce".into(),
            block,
            image: "example.test/rcsi:1".into(),
            spread,
            mount_path: "/data".into(),
        }
    }

    #[test]
    fn pods_mount_or_map_their_claim_and_read_the_secret() {
        let p = serde_json::to_value(spec(false, false).pod("rbench-0")).unwrap();
        let c = &p["spec"]["containers"][0];
        assert_eq!(c["volumeMounts"][0]["mountPath"], "/data");
        assert_eq!(c["command"][6], "/data");
        assert_eq!(
            c["env"][0]["valueFrom"]["secretKeyRef"]["name"],
            "rbench-abc123"
        );
        assert_eq!(
            p["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
            "rbench-0"
        );
        assert!(p["spec"]["affinity"].is_null());
        let p = serde_json::to_value(spec(true, true).pod("rbench-1")).unwrap();
        let c = &p["spec"]["containers"][0];
        assert_eq!(c["volumeDevices"][0]["devicePath"], DEVICE_PATH);
        assert_eq!(c["command"][6], DEVICE_PATH);
        assert_eq!(
            p["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
                [0]["podAffinityTerm"]["topologyKey"],
            "kubernetes.io/hostname"
        );
        let c = serde_json::to_value(spec(true, false).claim("rbench-1")).unwrap();
        assert_eq!(c["spec"]["volumeMode"], "Block");
        assert_eq!(c["spec"]["resources"]["requests"]["storage"], "10Gi");
        assert_eq!(c["metadata"]["labels"][RUN_LABEL], "abc123");
    }
}
