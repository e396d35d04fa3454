//! Distributed mode: `rbench --service PATH...` on each host, `rbench
//! --hosts` as the coordinator. One JSON message per line over TCP.
//!
//! A service writes and deletes files as whoever runs it (often root), so:
//! it listens on 127.0.0.1 unless told otherwise, refuses to listen beyond
//! this host without a secret, never receives the secret (it sends a fresh
//! challenge, and the coordinator answers with an HMAC-SHA256 of it and of
//! the command line, so neither can be replayed or altered), and works only
//! under the PATHs it was started with. Then each phase starts on all hosts
//! at once and the coordinator merges the results (latency histograms
//! included, so percentiles are exact over all hosts).

use crate::config::{Args, Config, Phase};
use crate::error::{BenchError, Result};
use crate::run;
use crate::stats::{self, Done, Latency, PhaseResult, Sample, Totals};
use clap::Parser;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Coordinator to service.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Request {
    /// Answer the challenge and hand over the command line, with this host's rank.
    Hello {
        /// HMAC-SHA256 (hex) over the challenge and the rest of this message.
        proof: String,
        args: Vec<String>,
        rank: usize,
        hosts: usize,
    },
    /// Run one phase of one iteration.
    Phase { index: usize, iteration: u64 },
}

/// Service to coordinator.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Reply {
    /// Sent on connect: a fresh random nonce (hex) to prove the secret against.
    Challenge { nonce: String },
    /// The command line is valid here; these are its phases.
    Ready { phases: usize },
    /// Results of a phase, each with its histogram (deflated V2, hex).
    Results { results: Vec<WireResult> },
    /// Something failed; `usage` when it is the command line's fault.
    Error { message: String, usage: bool },
}

#[derive(Debug, Serialize, Deserialize)]
struct WireResult {
    result: serde_json::Value,
    hdr: String,
}

fn send<T: Serialize>(stream: &mut TcpStream, msg: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(msg).expect("messages serialize");
    line.push(b'\n');
    stream.write_all(&line)
}

fn recv<T: for<'de> Deserialize<'de>>(
    reader: &mut BufReader<TcpStream>,
) -> std::io::Result<Option<T>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    serde_json::from_str(&line)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

fn encode_hdr(h: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    V2DeflateSerializer::new()
        .serialize(h, &mut bytes)
        .expect("histogram serializes");
    hex(&bytes)
}

fn decode_hdr(hex: &str) -> Option<Histogram<u64>> {
    let bytes = unhex(hex)?;
    Deserializer::new().deserialize(&mut bytes.as_slice()).ok()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// What the HMAC covers: the challenge and everything the Hello asks for.
fn transcript(nonce: &str, args: &[String], rank: usize, hosts: usize) -> Vec<u8> {
    let body = serde_json::to_string(&(args, rank, hosts)).expect("serializes");
    format!("rbench-hello-v1\n{nonce}\n{body}").into_bytes()
}

fn key(secret: &str) -> ring::hmac::Key {
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes())
}

/// How a service is started.
pub struct ServiceOptions<'a> {
    /// Address to listen on.
    pub bind: &'a str,
    /// TCP port.
    pub port: u16,
    /// Shared secret (may be empty on loopback only).
    pub secret: &'a str,
    /// Directories and files coordinators may work on.
    pub roots: &'a [String],
}

/// Serves coordinators one at a time, forever.
pub fn serve(opts: &ServiceOptions<'_>) -> Result<()> {
    let (bind, port, secret) = (opts.bind, opts.port, opts.secret);
    let addrs: Vec<std::net::SocketAddr> = (bind, port)
        .to_socket_addrs()
        .map_err(|e| BenchError::Usage(format!("--bind {bind}: {e}")))?
        .collect();
    if secret.is_empty() && addrs.iter().any(|a| !a.ip().is_loopback()) {
        return Err(BenchError::Usage(format!(
            "--bind {bind} accepts work from other hosts, which may then write and delete files here: set --secret (or RBENCH_SECRET), or bind to 127.0.0.1"
        )));
    }
    if opts.roots.is_empty() {
        return Err(BenchError::Usage(
            "rbench --service needs the directories or files coordinators may use: rbench --service [options] PATH...".into(),
        ));
    }
    let roots = opts
        .roots
        .iter()
        .map(|r| {
            std::fs::canonicalize(r)
                .map_err(|e| BenchError::Usage(format!("service path {r}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let listener = TcpListener::bind((bind, port))
        .map_err(|e| BenchError::io(format!("listening on {bind}:{port}"), e))?;
    eprintln!(
        "rbench: service listening on {}",
        listener
            .local_addr()
            .map_err(|e| BenchError::io("local address", e))?
    );
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        if let Err(e) = session(stream, secret, &roots) {
            eprintln!("rbench: session with {peer} ended: {e}");
        }
    }
    Ok(())
}

/// Where `p` is once symlinks are resolved (its parent's, for a file yet to be made).
fn resolved(p: &std::path::Path) -> Option<std::path::PathBuf> {
    std::fs::canonicalize(p).ok().or_else(|| {
        Some(
            std::fs::canonicalize(p.parent()?)
                .ok()?
                .join(p.file_name()?),
        )
    })
}

/// The first target of `cfg` outside every root, if any.
fn outside(cfg: &Config, roots: &[std::path::PathBuf]) -> Option<String> {
    let targets = match &cfg.mode {
        crate::config::Mode::Dir(d) => std::slice::from_ref(d),
        crate::config::Mode::File(f) => f.as_slice(),
    };
    targets
        .iter()
        .find(|t| !resolved(t).is_some_and(|r| roots.iter().any(|root| r.starts_with(root))))
        .map(|t| t.display().to_string())
}

fn session(stream: TcpStream, secret: &str, roots: &[std::path::PathBuf]) -> std::io::Result<()> {
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut nonce = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
        .map_err(|_| std::io::Error::other("no randomness for the challenge"))?;
    let nonce = hex(&nonce);
    send(
        &mut out,
        &Reply::Challenge {
            nonce: nonce.clone(),
        },
    )?;
    let Some(Request::Hello {
        proof,
        args,
        rank,
        hosts,
    }) = recv(&mut reader)?
    else {
        return send(
            &mut out,
            &Reply::Error {
                message: "expected hello".into(),
                usage: false,
            },
        );
    };
    let genuine = unhex(&proof).is_some_and(|p| {
        ring::hmac::verify(&key(secret), &transcript(&nonce, &args, rank, hosts), &p).is_ok()
    });
    if !genuine {
        return send(
            &mut out,
            &Reply::Error {
                message: "wrong secret".into(),
                usage: true,
            },
        );
    }
    let cfg = match Args::try_parse_from(std::iter::once("rbench".to_owned()).chain(args))
        .map_err(|e| crate::error::one_line(&e))
        .and_then(Config::from_args)
        // A service draws nothing: the coordinator shows the run.
        .map(|c| Config {
            live: crate::live::Live::Off,
            ..c
        }) {
        Ok(c) if let Some(t) = outside(&c, roots) => {
            let allowed: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
            return send(
                &mut out,
                &Reply::Error {
                    message: format!(
                        "{t} is outside the paths this service works on ({})",
                        allowed.join(", ")
                    ),
                    usage: true,
                },
            );
        }
        Ok(c) if rank < hosts => Config { rank, hosts, ..c },
        Ok(_) => {
            return send(
                &mut out,
                &Reply::Error {
                    message: format!("bad rank {rank} of {hosts}"),
                    usage: false,
                },
            );
        }
        Err(message) => {
            return send(
                &mut out,
                &Reply::Error {
                    message,
                    usage: true,
                },
            );
        }
    };
    send(
        &mut out,
        &Reply::Ready {
            phases: cfg.phases.len(),
        },
    )?;
    while let Some(Request::Phase { index, iteration }) = recv(&mut reader)? {
        let Some(&phase) = cfg.phases.get(index) else {
            return send(
                &mut out,
                &Reply::Error {
                    message: format!("no phase {index}"),
                    usage: false,
                },
            );
        };
        let reply = match run::prepare_targets(&cfg, phase)
            .and_then(|()| run::run_phase(&cfg, phase, iteration))
            .and_then(|rs| run::after_phase(&cfg).map(|()| rs))
        {
            Ok(rs) => Reply::Results {
                results: rs
                    .iter()
                    .map(|r| WireResult {
                        result: serde_json::to_value(r).expect("results serialize"),
                        hdr: r.hdr.as_ref().map(encode_hdr).unwrap_or_default(),
                    })
                    .collect(),
            },
            Err(e) => Reply::Error {
                message: e.to_string(),
                usage: matches!(e, BenchError::Usage(_)),
            },
        };
        send(&mut out, &reply)?;
    }
    Ok(())
}

struct Host {
    name: String,
    out: TcpStream,
    reader: BufReader<TcpStream>,
    /// The service's challenge.
    nonce: String,
}

impl Host {
    fn connect(name: &str, default_port: u16) -> Result<Self> {
        let addr = if name.contains(':') {
            name.to_owned()
        } else {
            format!("{name}:{default_port}")
        };
        let fail =
            |what: &str, e: std::io::Error| BenchError::io(format!("host {addr}: {what}"), e);
        let sock = addr
            .to_socket_addrs()
            .map_err(|e| fail("cannot resolve", e))?
            .next()
            .ok_or_else(|| fail("cannot resolve", std::io::ErrorKind::NotFound.into()))?;
        let stream = TcpStream::connect_timeout(&sock, Duration::from_secs(5))
            .map_err(|e| fail("unreachable", e))?;
        stream.set_nodelay(true).map_err(|e| fail("socket", e))?;
        let mut host = Self {
            name: addr.clone(),
            out: stream.try_clone().map_err(|e| fail("socket", e))?,
            reader: BufReader::new(stream),
            nonce: String::new(),
        };
        match host.recv("the challenge")? {
            Reply::Challenge { nonce } => host.nonce = nonce,
            _ => return Err(host_error(&addr, "did not send a challenge".into(), false)),
        }
        Ok(host)
    }

    fn send(&mut self, msg: &Request) -> Result<()> {
        send(&mut self.out, msg)
            .map_err(|e| BenchError::io(format!("host {}: connection lost", self.name), e))
    }

    fn recv(&mut self, during: &str) -> Result<Reply> {
        match recv(&mut self.reader) {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(BenchError::io(
                format!("host {} disconnected during {during}", self.name),
                std::io::ErrorKind::UnexpectedEof.into(),
            )),
            Err(e) => Err(BenchError::io(
                format!("host {}: connection lost during {during}", self.name),
                e,
            )),
        }
    }
}

fn host_error(name: &str, message: String, usage: bool) -> BenchError {
    let message = format!("host {name}: {message}");
    if usage {
        BenchError::Usage(message)
    } else {
        BenchError::io(message, std::io::Error::other("failed"))
    }
}

/// The phases a coordinator's command line asks for, in order.
pub fn phase_names(args: &Args) -> Vec<&'static str> {
    args.phases().into_iter().map(Phase::name).collect()
}

/// How many iterations a command line asks for (None: until stopped).
pub fn iterations(args: &Args) -> Result<Option<u64>> {
    if args.infloop {
        return Ok(None);
    }
    args.iterations
        .trim()
        .parse()
        .map(Some)
        .map_err(|_| BenchError::Usage("--iterations is not a whole number".into()))
}

/// Runs the benchmark on every host; `args` is the command line without
/// the coordinator's own options. Results go to `sink` as they are merged.
pub fn coordinate(
    hosts: &[String],
    port: u16,
    secret: &str,
    args: Vec<String>,
    iterations: Option<u64>,
    phase_names: &[&str],
    sink: &mut dyn FnMut(&PhaseResult) -> Result<()>,
) -> Result<()> {
    let mut conns = hosts
        .iter()
        .map(|h| Host::connect(h, port))
        .collect::<Result<Vec<_>>>()?;
    let n = conns.len();
    for (rank, h) in conns.iter_mut().enumerate() {
        let mac = ring::hmac::sign(&key(secret), &transcript(&h.nonce, &args, rank, n));
        h.send(&Request::Hello {
            proof: hex(mac.as_ref()),
            args: args.clone(),
            rank,
            hosts: n,
        })?;
    }
    for h in &mut conns {
        match h.recv("set-up")? {
            Reply::Ready { .. } => {}
            Reply::Error { message, usage } => return Err(host_error(&h.name, message, usage)),
            Reply::Results { .. } | Reply::Challenge { .. } => {
                return Err(host_error(&h.name, "unexpected reply".into(), false));
            }
        }
    }
    let mut iteration = 0;
    while iterations.is_none_or(|n| iteration < n) {
        iteration += 1;
        for (index, name) in phase_names.iter().enumerate() {
            // Send to every host first, so all start together.
            for h in &mut conns {
                h.send(&Request::Phase { index, iteration })?;
            }
            let mut per_host: Vec<Vec<PhaseResult>> = Vec::new();
            for h in &mut conns {
                match h.recv(name)? {
                    Reply::Results { results } => per_host.push(
                        results
                            .into_iter()
                            .map(|w| {
                                let mut r: PhaseResult =
                                    serde_json::from_value(w.result).unwrap_or_default();
                                r.hdr = decode_hdr(&w.hdr);
                                r.host = h.name.clone();
                                r
                            })
                            .collect(),
                    ),
                    Reply::Error { message, usage } => {
                        return Err(host_error(&h.name, message, usage));
                    }
                    Reply::Ready { .. } | Reply::Challenge { .. } => {
                        return Err(host_error(&h.name, "unexpected reply".into(), false));
                    }
                }
            }
            for k in 0..per_host[0].len() {
                let parts: Vec<PhaseResult> = per_host
                    .iter()
                    .filter_map(|rs| rs.get(k).cloned())
                    .collect();
                sink(&aggregate(parts))?;
            }
        }
    }
    Ok(())
}

/// Merges the same phase from several hosts: totals add up, first-done is
/// the sum of every host's first-done totals over the latest first-done
/// time (a conservative rate), last-done likewise, latency histograms merge.
pub fn aggregate(parts: Vec<PhaseResult>) -> PhaseResult {
    let totals = |d: &Done| Totals {
        ops: d.ops,
        bytes: d.bytes,
        entries: d.entries,
    };
    let sum = |f: &dyn Fn(&PhaseResult) -> Totals| {
        parts.iter().map(f).fold(Totals::default(), |a, b| a + b)
    };
    let max_ms = |f: &dyn Fn(&PhaseResult) -> f64| parts.iter().map(f).fold(0.0, f64::max);
    let ms = |v: f64| Duration::from_secs_f64(v / 1e3);
    let mut hist = stats::new_histogram();
    for p in &parts {
        if let Some(h) = &p.hdr {
            hist.add(h).expect("histograms share bounds");
        }
    }
    let mut series: Vec<Sample> = Vec::new();
    for p in &parts {
        for (i, s) in p.series.iter().enumerate() {
            match series.get_mut(i) {
                Some(t) => {
                    t.mib_per_s += s.mib_per_s;
                    t.iops += s.iops;
                    t.entries_per_s += s.entries_per_s;
                }
                None => series.push(s.clone()),
            }
        }
    }
    let first = parts.first().cloned().unwrap_or_default();
    PhaseResult {
        host: String::new(),
        threads: parts.iter().map(|p| p.threads).sum(),
        first: Done::new(
            sum(&|p| totals(&p.first)),
            ms(max_ms(&|p| p.first.elapsed_ms)),
        ),
        last: Done::new(
            sum(&|p| totals(&p.last)),
            ms(max_ms(&|p| p.last.elapsed_ms)),
        ),
        latency: Latency::from_histogram(&hist),
        histogram: stats::buckets(&hist),
        cpu_s: parts.iter().map(|p| p.cpu_s).sum(),
        cpu_user_s: parts.iter().map(|p| p.cpu_user_s).sum(),
        cpu_sys_s: parts.iter().map(|p| p.cpu_sys_s).sum(),
        time_limited: parts.iter().any(|p| p.time_limited),
        series,
        hdr: Some(hist),
        hosts: parts
            .iter()
            .map(|p| PhaseResult {
                first: Done::new(totals(&p.first), ms(p.first.elapsed_ms)),
                last: Done::new(totals(&p.last), ms(p.last.elapsed_ms)),
                latency: p
                    .hdr
                    .as_ref()
                    .map(Latency::from_histogram)
                    .unwrap_or_default(),
                hdr: None,
                series: Vec::new(),
                ..p.clone()
            })
            .collect(),
        ..first
    }
}
