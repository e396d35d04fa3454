//! `rbench`: measure throughput, IOPS, latency and metadata rates of storage.

use clap::Parser;
use rbench::config::{Args, Config};
use rbench::error::BenchError;
use rbench::{report, run};

fn main() {
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
            // One line: what is wrong; --help has the rest.
            let text = e.render().to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("rbench: {first} (see rbench --help)");
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

fn execute(args: Args) -> Result<(), BenchError> {
    let cfg = Config::from_args(args).map_err(BenchError::Usage)?;
    let mut results = Vec::new();
    run::run(&cfg, &mut |r| {
        print!("{}", report::text(r));
        results.push(r.clone());
        Ok(())
    })?;
    if let Some(p) = &cfg.json {
        report::write_json(p, &results)?;
    }
    if let Some(p) = &cfg.csv {
        report::append_csv(p, &results)?;
    }
    if let Some(p) = &cfg.chart {
        std::fs::write(p, rbench::chart::render(&results))
            .map_err(|e| BenchError::io(format!("writing {}", p.display()), e))?;
    }
    Ok(())
}
