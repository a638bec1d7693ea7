//! Compiles the contract's .proto files with protox (no system protoc) and
//! derives the method authorization table from the `Authorization` method
//! option, so the .proto files stay the single source of truth for who may
//! call what.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use prost_reflect::{DescriptorPool, Value};

const PROTOS: &[&str] = &[
    "metropolis/proto/ext/authorization.proto",
    "metropolis/proto/common/common.proto",
    "metropolis/proto/api/aaa.proto",
    "metropolis/proto/api/configuration.proto",
    "metropolis/proto/api/management.proto",
    "metropolis/proto/api/debug.proto",
    "metropolis/proto/admin/admin.proto",
    "metropolis/proto/admin/consensus.proto",
    "metropolis/proto/admin/faults.proto",
    "metropolis/proto/admin/node.proto",
    "metropolis/proto/admin/watch.proto",
    "metropolis/proto/storage/storage.proto",
    "metropolis/node/core/curator/proto/api/api.proto",
    "osbase/logtree/proto/logtree.proto",
    "osbase/net/proto/net.proto",
    "version/spec/spec.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let out = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut compiler = protox::Compiler::new([&root])?;
    compiler.include_imports(true);
    compiler.open_files(PROTOS)?;

    std::fs::write(
        out.join("descriptors.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    std::fs::write(
        out.join("authorization_table.rs"),
        authorization_table(&compiler.descriptor_pool())?,
    )?;

    let mut config = tonic_prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Small per-call buffers: see src/codec.rs.
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_fds_with_config(compiler.file_descriptor_set(), config)?;
    Ok(())
}

/// Renders `METHODS`, one entry per RPC method of every service. A method
/// without the option fails the build: there is no default-allow.
fn authorization_table(pool: &DescriptorPool) -> Result<String, Box<dyn std::error::Error>> {
    let ext = pool
        .get_extension_by_name("metropolis.proto.ext.authorization")
        .ok_or("extension metropolis.proto.ext.authorization not found")?;
    let mut rows = Vec::new();
    for service in pool.services() {
        for method in service.methods() {
            let path = format!("/{}/{}", service.full_name(), method.name());
            let options = method.options();
            if !options.has_extension(&ext) {
                return Err(
                    format!("{path} has no (metropolis.proto.ext.authorization) option").into(),
                );
            }
            let value = options.get_extension(&ext);
            let msg = value
                .as_message()
                .ok_or("authorization option is not a message")?;
            let need: Vec<i32> = match msg.get_field_by_name("need").as_deref() {
                Some(Value::List(items)) => {
                    items.iter().filter_map(Value::as_enum_number).collect()
                }
                _ => Vec::new(),
            };
            let unauth = msg
                .get_field_by_name("allow_unauthenticated")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            if need.is_empty() && !unauth {
                return Err(format!("{path}: authorization option needs no permission and does not allow unauthenticated calls").into());
            }
            rows.push((path, need, unauth));
        }
    }
    rows.sort();
    let mut src = String::from(
        "/// Every RPC method of every service, with the permissions it needs,\n\
         /// generated from the `(metropolis.proto.ext.authorization)` options.\n\
         pub static METHODS: &[MethodAuthorization] = &[\n",
    );
    for (path, need, unauth) in rows {
        let need = need
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        writeln!(
            src,
            "    MethodAuthorization {{ path: {path:?}, need: &[{need}], allow_unauthenticated: {unauth} }},"
        )?;
    }
    src.push_str("];\n");
    Ok(src)
}
