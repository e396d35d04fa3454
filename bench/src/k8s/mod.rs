//! `rbench k8s`: what a StorageClass delivers to pods. N claims and N pods
//! running `rbench --service` are created in a namespace, the time from
//! each claim's creation to Bound, to its pod Running and to its service
//! answering is recorded, the workload runs on all pods at once through the
//! distributed mode (reached through the API server's port-forward, so a
//! kubeconfig is all it needs), and everything is deleted again, the time
//! from each claim's deletion to its PV's removal recorded too.

pub mod objects;
pub mod session;
pub mod tables;
pub mod tunnel;

use crate::error::{BenchError, Result};
use crate::stats::PhaseResult;
use clap::Parser;
use objects::{RUN_LABEL, SERVICE_PORT, Spec};
use session::Session;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tables::{provisioning_table, side_by_side};
use tunnel::Tunnel;

/// `rbench k8s [OPTIONS] -- <workload flags>`.
#[derive(Debug, Parser)]
#[command(
    name = "rbench k8s",
    about = "Benchmark what StorageClasses deliver to pods: N claims and pods, provisioning times, the workload on all at once",
    after_help = "\
Examples:
  Two classes side by side, 4 volumes each, sequential and random I/O:
    rbench k8s --storageclass fast,standard --pvcs 4 --size 20Gi -- -w -r -t 4 -s 4g -b 1m
  Shared RWX volume metadata rates, pods spread over nodes, in an existing namespace:
    rbench k8s --storageclass nfs --pvcs 3 --access-mode RWX --node-spread --namespace rbench-bench \\
      -- -d -w --stat -r -F -D -t 4 -n 8 -N 1000 -s 64k
  Raw block volumes, 4 KiB random reads at depth 16:
    rbench k8s --storageclass rbd --volume-mode Block --size 10Gi -- -r -t 2 -b 4k --rand --direct --iodepth 16
The workload takes rbench's options (rbench --help-all) and no path. RBAC: manifests/rbench."
)]
pub struct K8sArgs {
    /// StorageClass(es) to measure, comma-separated (one after the other, side by side at the end).
    #[arg(long, value_delimiter = ',', required = true)]
    pub storageclass: Vec<String>,
    /// Claims (and pods) per StorageClass.
    #[arg(long, default_value_t = 1)]
    pub pvcs: usize,
    /// Size of each claim.
    #[arg(long, default_value = "10Gi")]
    pub size: String,
    /// RWO, RWX, ROX or RWOP.
    #[arg(long, default_value = "RWO")]
    pub access_mode: String,
    /// Filesystem or Block.
    #[arg(long, default_value = "Filesystem")]
    pub volume_mode: String,
    /// Use this existing namespace (default: a new `rbench-<id>`, deleted afterwards).
    #[arg(long)]
    pub namespace: Option<String>,
    /// Where pods mount a Filesystem volume (Block volumes appear at /dev/rbench).
    #[arg(long, default_value = "/data")]
    pub mount_path: String,
    /// Image holding the rbench binary.
    #[arg(long, default_value = "ghcr.io/rcsi/rcsi:0.1.0")]
    pub image: String,
    /// Spread the pods over nodes.
    #[arg(long)]
    pub node_spread: bool,
    /// Keep what was created (and say how to delete it).
    #[arg(long)]
    pub keep: bool,
    /// Seconds to wait for claims to bind, pods to run and services to answer.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Write results (and provisioning times) as JSON here.
    #[arg(long, visible_alias = "jsonfile")]
    pub json: Option<PathBuf>,
    /// Append results as CSV here.
    #[arg(long, visible_alias = "csvfile")]
    pub csv: Option<PathBuf>,
    /// Draw every phase's latency histogram and throughput into this SVG file.
    #[arg(long)]
    pub chart: Option<PathBuf>,
    /// The workload: rbench flags without a path (`-w -r -t 4 -s 1g -b 1m`).
    #[arg(last = true, required = true)]
    pub workload: Vec<String>,
}

/// Kubernetes' name for an access mode given short or long.
fn access_mode(v: &str) -> Result<&'static str> {
    Ok(match v {
        "RWO" | "ReadWriteOnce" => "ReadWriteOnce",
        "RWX" | "ReadWriteMany" => "ReadWriteMany",
        "ROX" | "ReadOnlyMany" => "ReadOnlyMany",
        "RWOP" | "ReadWriteOncePod" => "ReadWriteOncePod",
        _ => {
            return Err(BenchError::Usage(format!(
                "--access-mode {v}: one of RWO, RWX, ROX, RWOP"
            )));
        }
    })
}

/// When each step of one volume's life happened, from its claim's creation.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct VolumeTimes {
    /// Claim (and pod) name.
    pub name: String,
    /// Node the pod ran on.
    pub node: String,
    /// Claim Bound.
    pub bound_s: Option<f64>,
    /// Pod Running (volume attached and mounted).
    pub running_s: Option<f64>,
    /// Service answering through the tunnel.
    pub answering_s: Option<f64>,
    /// From the claim's deletion to its PV's removal.
    pub deleted_s: Option<f64>,
}

/// What a run of one StorageClass measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ClassRun {
    /// The StorageClass.
    pub storage_class: String,
    /// Per volume.
    pub volumes: Vec<VolumeTimes>,
    /// Workload results (aggregates over all pods, per host inside).
    pub results: Vec<PhaseResult>,
}

/// A name of `len` random lowercase hex digits.
fn random_hex(len: usize) -> Result<String> {
    use ring::rand::SecureRandom;
    let mut b = vec![0u8; len.div_ceil(2)];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| BenchError::io("random bytes", std::io::Error::other("no randomness")))?;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(hex[..len].to_owned())
}

/// Checks the workload flags as the services will read them (with the
/// pods' path) and returns its phases and iterations (None: endless).
fn workload_plan(workload: &[String], target: &str) -> Result<(Vec<String>, Option<u64>)> {
    let argv = std::iter::once("rbench")
        .chain(workload.iter().map(String::as_str))
        .chain([target]);
    let a = crate::config::Args::try_parse_from(argv).map_err(|e| {
        BenchError::Usage(format!(
            "the workload after --: {}",
            crate::error::one_line(&e)
        ))
    })?;
    if a.paths.len() > 1 {
        return Err(BenchError::Usage(format!(
            "the workload runs on the pods' {target}: leave out {}",
            a.paths[..a.paths.len() - 1].join(" ")
        )));
    }
    if a.service
        || !a.hosts.is_empty()
        || a.json.is_some()
        || a.csv.is_some()
        || a.chart.is_some()
        || a.resfile.is_some()
    {
        return Err(BenchError::Usage(
            "the workload after -- takes no --service, --hosts, --json, --csv, --chart or --resfile (give --json, --csv, --chart before --)".into(),
        ));
    }
    let phases = crate::dist::phase_names(&a);
    if phases.is_empty() {
        return Err(BenchError::Usage(
            "nothing to do: choose at least one of -d, -w, -r, --stat, -F, -D after --".into(),
        ));
    }
    let iterations = crate::dist::iterations(&a)?;
    Ok((phases.into_iter().map(str::to_owned).collect(), iterations))
}

/// Runs `rbench k8s` with the command line after `k8s`.
pub fn main(argv: Vec<String>) -> Result<()> {
    let args = K8sArgs::try_parse_from(std::iter::once("rbench k8s".to_owned()).chain(argv))
        .map_err(|e| {
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) {
                let _ = e.print();
                std::process::exit(0);
            }
            BenchError::Usage(format!(
                "{} (see rbench k8s --help)",
                crate::error::one_line(&e)
            ))
        })?;
    let rt = tokio::runtime::Runtime::new()
        .map_err(|e| BenchError::io("starting the async runtime", e))?;
    rt.block_on(async {
        let client = kube::Client::try_default().await.map_err(|e| {
            BenchError::Cluster(format!(
                "no Kubernetes cluster: {e} (set KUBECONFIG or run inside a pod)"
            ))
        })?;
        let tunnel = Arc::new(tunnel::PortForward {
            client: client.clone(),
        });
        run(client, tunnel, args).await
    })
}

/// The whole command against `client`, services reached through `tunnel`.
pub async fn run(client: kube::Client, tunnel: Arc<dyn Tunnel>, args: K8sArgs) -> Result<()> {
    let mode = access_mode(&args.access_mode)?;
    let block = match args.volume_mode.as_str() {
        "Filesystem" => false,
        "Block" => true,
        v => {
            return Err(BenchError::Usage(format!(
                "--volume-mode {v}: Filesystem or Block"
            )));
        }
    };
    if args.pvcs == 0 {
        return Err(BenchError::Usage("--pvcs must be at least 1".into()));
    }
    let target = if block {
        objects::DEVICE_PATH
    } else {
        args.mount_path.as_str()
    };
    let (phases, iterations) = workload_plan(&args.workload, target)?;
    let run_id = random_hex(6)?;
    let (ns, own_ns) = match &args.namespace {
        Some(n) => (n.clone(), false),
        None => (format!("rbench-{run_id}"), true),
    };
    let mut session = Session::new(
        client,
        tunnel,
        ns.clone(),
        own_ns,
        Duration::from_secs(args.timeout.max(1)),
    );
    session.preflight(&args.storageclass).await?;
    let secret = random_hex(64)?;
    let mut runs: Vec<ClassRun> = Vec::new();
    let mut outcome = Ok(());
    for (k, sc) in args.storageclass.iter().enumerate() {
        let spec = Spec {
            run: format!("{run_id}-{k}"),
            secret_name: format!("rbench-{run_id}"),
            storage_class: sc.clone(),
            size: args.size.clone(),
            access_mode: mode.into(),
            block,
            image: args.image.clone(),
            spread: args.node_spread,
            mount_path: args.mount_path.clone(),
        };
        let mut class = ClassRun {
            storage_class: sc.clone(),
            ..Default::default()
        };
        let step = async {
            if k == 0 {
                session.prepare(&spec, &secret).await?;
            }
            let (times, addrs) = session.provision(&spec, args.pvcs).await?;
            class.volumes = times;
            println!(
                "{sc}: {} pods serving; running the workload on all of them",
                addrs.len()
            );
            let mut workload = args.workload.clone();
            if !workload
                .iter()
                .any(|a| a == "--label" || a.starts_with("--label="))
            {
                workload.extend(["--label".into(), sc.clone()]);
            }
            workload.push(spec.target().into());
            let hosts: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
            // Results name pods (and their nodes), not the tunnels' ports.
            let pod_of: std::collections::HashMap<String, String> = hosts
                .iter()
                .cloned()
                .zip(
                    class
                        .volumes
                        .iter()
                        .map(|t| format!("{} ({})", t.name, t.node)),
                )
                .collect();
            let secret = secret.clone();
            let phases = phases.clone();
            let results = tokio::task::spawn_blocking(move || {
                let names: Vec<&str> = phases.iter().map(String::as_str).collect();
                let mut results = Vec::new();
                crate::dist::coordinate(
                    &hosts,
                    SERVICE_PORT,
                    &secret,
                    workload,
                    iterations,
                    &names,
                    &mut |r: &PhaseResult| {
                        let mut r = r.clone();
                        for h in &mut r.hosts {
                            h.host = pod_of.get(&h.host).cloned().unwrap_or_default();
                        }
                        print!("{}", crate::report::text(&r));
                        for h in &r.hosts {
                            println!(
                                "{:<10}pod {:<28}: {:>9.1} MiB/s {:>10.1} IOPS {:>10.1} entries/s",
                                "", h.host, h.last.mib_per_s, h.last.iops, h.last.entries_per_s
                            );
                        }
                        results.push(r);
                        Ok(())
                    },
                )
                .map(|()| results)
            })
            .await
            .map_err(|e| BenchError::io("the workload", std::io::Error::other(e)))??;
            class.results = results;
            Ok::<(), BenchError>(())
        };
        let r = tokio::select! {
            r = step => r,
            _ = tokio::signal::ctrl_c() => Err(BenchError::Cluster("interrupted (Ctrl-C)".into())),
        };
        if !args.keep {
            let left = session.cleanup(&mut class.volumes).await;
            if !left.is_empty() {
                eprintln!(
                    "rbench k8s: could not remove everything in namespace {ns}:\n  {}",
                    left.join("\n  ")
                );
            }
        }
        print!("{}", provisioning_table(&class));
        runs.push(class);
        if r.is_err() {
            outcome = r;
            break;
        }
    }
    if args.keep {
        println!(
            "kept: namespace {ns} (delete with: kubectl delete namespace {ns}, or the objects labelled {RUN_LABEL})"
        );
    } else {
        let left = session.cleanup_rest().await;
        if !left.is_empty() {
            eprintln!("rbench k8s: could not remove:\n  {}", left.join("\n  "));
        }
    }
    if runs.len() > 1 {
        print!("{}", side_by_side(&runs));
    }
    let results: Vec<PhaseResult> = runs.iter().flat_map(|r| r.results.clone()).collect();
    if let Some(p) = &args.json {
        let doc = serde_json::json!({"storageclasses": runs});
        std::fs::write(p, serde_json::to_vec_pretty(&doc).expect("serializable"))
            .map_err(|e| BenchError::io(format!("writing {}", p.display()), e))?;
    }
    if let Some(p) = &args.csv {
        crate::report::append_csv(p, &results)?;
    }
    if let Some(p) = &args.chart {
        std::fs::write(p, crate::chart::render(&results))
            .map_err(|e| BenchError::io(format!("writing {}", p.display()), e))?;
    }
    outcome
}
