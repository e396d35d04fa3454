//! `rbench`: measure throughput, IOPS, latency and metadata rates of storage.

use clap::Parser;
use rbench::config::{Args, Config};
use rbench::error::BenchError;
use rbench::{report, run};

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("k8s") {
        let code = match rbench::k8s::main(argv[2..].to_vec()) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("rbench k8s: {e}");
                e.exit_code()
            }
        };
        std::process::exit(code);
    }
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            let _ = e.print();
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!(
                "rbench: {} (see rbench --help)",
                rbench::error::one_line(&e)
            );
            std::process::exit(2);
        }
    };
    let code = match execute(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("rbench: {e}");
            e.exit_code()
        }
    };
    std::process::exit(code);
}

/// Our command line with the value of --secret blanked out.
fn redacted_command() -> String {
    let mut out = Vec::new();
    let mut hide = false;
    for a in std::env::args() {
        if std::mem::take(&mut hide) {
            out.push("***".to_owned());
        } else if a.starts_with("--secret=") {
            out.push("--secret=***".to_owned());
        } else {
            hide = a == "--secret";
            out.push(a);
        }
    }
    out.join(" ")
}

/// Options that only the coordinator uses, with whether they take a value.
const COORDINATOR_ONLY: &[(&str, bool)] = &[
    ("--hosts", true),
    ("--port", true),
    ("--bind", true),
    ("--secret", true),
    ("--json", true),
    ("--jsonfile", true),
    ("--csv", true),
    ("--csvfile", true),
    ("--resfile", true),
    ("--chart", true),
    ("--progress", true),
    ("--live1", false),
    ("--nolive", false),
];

/// The command line to hand to services: ours without coordinator options.
fn service_args() -> Vec<String> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in std::env::args().skip(1) {
        if std::mem::take(&mut skip) {
            continue;
        }
        match COORDINATOR_ONLY
            .iter()
            .find(|(o, _)| a == *o || a.starts_with(&format!("{o}=")))
        {
            Some((o, takes)) => skip = *takes && a == *o,
            None => out.push(a),
        }
    }
    out
}

fn execute(args: Args) -> Result<(), BenchError> {
    if args.service {
        return rbench::dist::serve(&rbench::dist::ServiceOptions {
            bind: &args.bind,
            port: args.port,
            secret: &args.secret,
            roots: &args.paths,
        });
    }
    let mut results = Vec::new();
    let mut tables = String::new();
    let mut sink = |r: &rbench::stats::PhaseResult| {
        let mut t = report::text(r);
        for h in &r.hosts {
            t.push_str(&format!(
                "{:<10}host {:<21}: {:>9.1} MiB/s {:>10.1} IOPS {:>10.1} entries/s\n",
                "", h.host, h.last.mib_per_s, h.last.iops, h.last.entries_per_s
            ));
        }
        print!("{t}");
        tables.push_str(&t);
        results.push(r.clone());
        Ok(())
    };
    let (json, csv, chart) = (args.json.clone(), args.csv.clone(), args.chart.clone());
    let resfile = args.resfile.clone();
    let mut notes = String::new();
    if args.hosts.is_empty() {
        let cfg = Config::from_args(args).map_err(BenchError::Usage)?;
        for n in &cfg.notes {
            let line = format!("note: {n}\n");
            print!("{line}");
            notes.push_str(&line);
        }
        run::run(&cfg, &mut sink)?;
    } else {
        let names = rbench::dist::phase_names(&args);
        if names.is_empty() {
            return Err(BenchError::Usage(
                "nothing to do: choose at least one of -d, -w, -r, --stat, -F, -D".into(),
            ));
        }
        let iterations = rbench::dist::iterations(&args)?;
        // The services decide the same; say it here, where the results are.
        let given = args
            .size
            .as_deref()
            .and_then(|s| rbench::units::parse_size(s).ok());
        if let Some((_, n)) = given.and_then(|s| rbench::config::shrunk_block(&args, s)) {
            let line = format!("note: {n}\n");
            print!("{line}");
            notes.push_str(&line);
        }
        rbench::dist::coordinate(
            &args.hosts,
            args.port,
            &args.secret,
            service_args(),
            iterations,
            &names,
            &mut sink,
        )?;
    }
    if let Some(p) = &resfile {
        report::append_text(p, &redacted_command(), &(notes + &tables))?;
    }
    if let Some(p) = &json {
        report::write_json(p, &results)?;
    }
    if let Some(p) = &csv {
        report::append_csv(p, &results)?;
    }
    if let Some(p) = &chart {
        std::fs::write(p, rbench::chart::render(&results))
            .map_err(|e| BenchError::io(format!("writing {}", p.display()), e))?;
    }
    Ok(())
}
