//! Compiles proto/csi.proto with protox (no system protoc) and generates a
//! redacting `Debug` for every message that carries a `csi_secret` field.

use std::fmt::Write as _;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proto");
    println!("cargo:rerun-if-changed={}", proto_dir.display());

    let mut compiler = protox::Compiler::new([&proto_dir])?;
    compiler.include_imports(true);
    compiler.open_file("csi.proto")?;
    compiler.open_file("pluginregistration.proto")?;
    let pool = compiler.descriptor_pool();
    let secret_ext = pool
        .get_extension_by_name("csi.v1.csi_secret")
        .ok_or("csi.proto lacks the csi_secret extension")?;

    let mut redacted = Vec::new();
    let mut debug_impls = String::new();
    for msg in pool.all_messages().filter(|m| m.package_name() == "csi.v1") {
        let secret = |f: &prost_reflect::FieldDescriptor| {
            f.options().get_extension(&secret_ext).as_bool() == Some(true)
        };
        if !msg.fields().any(|f| secret(&f)) {
            continue;
        }
        assert!(
            msg.parent_message().is_none(),
            "nested secret-bearing messages are not supported"
        );
        redacted.push(format!(".{}", msg.full_name()));
        let name = msg.name();
        writeln!(
            debug_impls,
            "impl ::core::fmt::Debug for {name} {{\n    fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {{\n        f.debug_struct(\"{name}\")"
        )?;
        for field in msg.fields() {
            if field.containing_oneof().is_some_and(|o| !o.is_synthetic()) {
                continue;
            }
            let n = field.name();
            if secret(&field) {
                writeln!(
                    debug_impls,
                    "            .field(\"{n}\", &crate::redact::Redacted(&self.{n}))"
                )?;
            } else {
                writeln!(debug_impls, "            .field(\"{n}\", &self.{n})")?;
            }
        }
        for oneof in msg.oneofs().filter(|o| !o.is_synthetic()) {
            let n = oneof.name();
            writeln!(debug_impls, "            .field(\"{n}\", &self.{n})")?;
        }
        writeln!(debug_impls, "            .finish()\n    }}\n}}")?;
    }

    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("csi_redact.rs"), debug_impls)?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::CsiCodec")
        .skip_debug(redacted)
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
