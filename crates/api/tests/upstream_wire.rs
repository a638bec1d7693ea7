//! Wire compatibility with upstream Metropolis, checked against a committed
//! table of upstream's definitions (`upstream_wire.txt`).
//!
//! The table lists, for every message, enum and service under an upstream
//! package name, what an upstream-generated client relies on: field numbers,
//! names, types, cardinality and oneof membership; enum values; method names,
//! types and streaming. Under those names ours must be exactly the table,
//! plus only fields numbered 1000 and up (what is ours).
//!
//! The table was produced from upstream's .proto files (commit in its first
//! line). To refresh it after upstream changes, compile upstream's files into
//! a descriptor set and run the ignored `print_table` test:
//!
//! ```text
//! protox -I <upstream checkout> --include-imports -o /tmp/up.bin <files...>
//! UPSTREAM_DESCRIPTORS=/tmp/up.bin cargo test -p metropolis-api --test upstream_wire \
//!     -- --ignored --nocapture print_table > crates/api/tests/upstream_wire.txt
//! ```

use std::collections::BTreeSet;

use prost_reflect::{Cardinality, DescriptorPool, FieldDescriptor, Kind, MessageDescriptor};

/// The packages whose names are upstream's.
const UPSTREAM_PACKAGES: &[&str] = &[
    "metropolis.proto.api",
    "metropolis.proto.common",
    "metropolis.proto.ext",
    "metropolis.node.core.curator.proto.api",
    "osbase.logtree.proto",
    "osbase.net.proto",
    "version.spec",
];

/// Field numbers from here on are ours on upstream's messages.
const FIRST_OWN_FIELD: u32 = 1000;

const TABLE: &str = include_str!("upstream_wire.txt");

fn kind_name(field: &FieldDescriptor) -> String {
    match field.kind() {
        Kind::Message(m) => m.full_name().to_owned(),
        Kind::Enum(e) => e.full_name().to_owned(),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn describe_message(msg: &MessageDescriptor, own_fields: bool, out: &mut BTreeSet<String>) {
    let name = msg.full_name();
    out.insert(format!("message {name}"));
    for field in msg.fields() {
        if !own_fields && field.number() >= FIRST_OWN_FIELD {
            continue;
        }
        let label = match field.cardinality() {
            Cardinality::Repeated => "repeated",
            Cardinality::Required => "required",
            Cardinality::Optional if field.field_descriptor_proto().proto3_optional() => "optional",
            Cardinality::Optional => "singular",
        };
        let oneof = match field.containing_oneof() {
            Some(o) if !field.field_descriptor_proto().proto3_optional() => {
                format!(" oneof={}", o.name())
            }
            _ => String::new(),
        };
        out.insert(format!(
            "field {name} {} {} {label} {}{oneof}",
            field.number(),
            field.name(),
            kind_name(&field),
        ));
    }
    for nested in msg.child_messages() {
        describe_message(&nested, own_fields, out);
    }
    for e in msg.child_enums() {
        describe_enum(&e, out);
    }
}

fn describe_enum(e: &prost_reflect::EnumDescriptor, out: &mut BTreeSet<String>) {
    let name = e.full_name();
    out.insert(format!("enum {name}"));
    for v in e.values() {
        out.insert(format!("value {name} {} {}", v.number(), v.name()));
    }
}

/// One line per definition under an upstream package name. With
/// `own_fields == false`, fields numbered 1000+ are left out.
fn describe(pool: &DescriptorPool, own_fields: bool) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for file in pool.files() {
        if !UPSTREAM_PACKAGES.contains(&file.package_name()) {
            continue;
        }
        for msg in file.messages() {
            describe_message(&msg, own_fields, &mut out);
        }
        for e in file.enums() {
            describe_enum(&e, &mut out);
        }
        for svc in file.services() {
            out.insert(format!("service {}", svc.full_name()));
            for m in svc.methods() {
                out.insert(format!(
                    "method {}.{} {}{} -> {}{}",
                    svc.full_name(),
                    m.name(),
                    if m.is_client_streaming() {
                        "stream "
                    } else {
                        ""
                    },
                    m.input().full_name(),
                    if m.is_server_streaming() {
                        "stream "
                    } else {
                        ""
                    },
                    m.output().full_name(),
                ));
            }
        }
        for ext in file.extensions() {
            out.insert(format!(
                "extension {} {} {} {}",
                ext.containing_message().full_name(),
                ext.number(),
                ext.full_name(),
                kind_name_ext(&ext),
            ));
        }
    }
    out
}

fn kind_name_ext(ext: &prost_reflect::ExtensionDescriptor) -> String {
    match ext.kind() {
        Kind::Message(m) => m.full_name().to_owned(),
        Kind::Enum(e) => e.full_name().to_owned(),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn upstream_table() -> BTreeSet<String> {
    TABLE
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

fn ours() -> &'static DescriptorPool {
    metropolis_api::json::descriptor_pool().expect("embedded descriptors decode")
}

#[test]
fn upstream_names_hold_upstream_definitions() {
    let want = upstream_table();
    let have = describe(ours(), false);
    let missing: Vec<_> = want.difference(&have).collect();
    let extra: Vec<_> = have.difference(&want).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "under upstream package names, these differ from upstream\n\
         missing (upstream has, we lack):\n  {}\n\
         extra (ours, below field 1000 or not upstream's):\n  {}",
        missing
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n  "),
        extra
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n  "),
    );
}

#[test]
fn table_is_not_empty_and_covers_every_upstream_package() {
    let table = upstream_table();
    for pkg in UPSTREAM_PACKAGES {
        assert!(
            table.iter().any(|l| l.contains(&format!(" {pkg}."))),
            "table has nothing for {pkg}"
        );
    }
}

/// Bytes written by hand with upstream's field numbers decode to what an
/// upstream client meant, and ours encode the same way.
#[test]
fn hand_encoded_upstream_messages_decode() {
    use metropolis_api::common::NodeState;
    use metropolis_api::curator::{
        GetConsensusStatusResponse, Node, RegisterNodeRequest,
        get_consensus_status_response::etcd_member::Status,
    };
    use prost::Message;

    // curator Node: id=1, roles=2 (consensus_member), status=3
    // (external_address), clusternet=4 (wireguard_pubkey), state=5 (UP),
    // labels=6 (z=a).
    let node: &[u8] = &[
        0x0a, 1, b'n', //
        0x12, 2, 0x12, 0, //
        0x1a, 3, 0x0a, 1, b'a', //
        0x22, 3, 0x0a, 1, b'k', //
        0x28, 3, //
        0x32, 8, 0x0a, 6, 0x0a, 1, b'z', 0x12, 1, b'a',
    ];
    let n = Node::decode(node).expect("decode Node");
    assert_eq!(n.id, "n");
    assert!(
        n.roles
            .as_ref()
            .and_then(|r| r.consensus_member.as_ref())
            .is_some()
    );
    assert_eq!(
        n.status.as_ref().map(|s| s.external_address.as_str()),
        Some("a")
    );
    assert_eq!(
        n.clusternet.as_ref().map(|c| c.wireguard_pubkey.as_str()),
        Some("k")
    );
    assert_eq!(n.state, NodeState::Up as i32);
    assert_eq!(
        n.labels.as_ref().map(|l| l.pairs[0].key.as_str()),
        Some("z")
    );
    assert!(!n.decommission_requested);
    assert_eq!(n.encode_to_vec(), node);
    // Ours past 1000: field 1000, varint (tag 8000), which upstream skips.
    let flagged = Node {
        decommission_requested: true,
        ..Default::default()
    };
    assert_eq!(flagged.encode_to_vec(), [0xc0, 0x3e, 1]);

    // RegisterNodeRequest: register_ticket=1, join_key=2, have_local_tpm=3,
    // labels=4.
    let mut reg = vec![0x0a, 1, b't', 0x12, 32];
    reg.extend([7u8; 32]);
    reg.extend([0x18, 1, 0x22, 0]);
    let r = RegisterNodeRequest::decode(reg.as_slice()).expect("decode RegisterNodeRequest");
    assert_eq!(r.register_ticket, b"t");
    assert_eq!(r.join_key, [7u8; 32]);
    assert!(r.have_local_tpm);
    assert!(r.labels.is_some());

    // GetConsensusStatusResponse: etcd_member=1 {id=1, status=2 (FULL)}.
    let status: &[u8] = &[0x0a, 5, 0x0a, 1, b'm', 0x10, 2];
    let s = GetConsensusStatusResponse::decode(status).expect("decode status");
    assert_eq!(s.etcd_member.len(), 1);
    assert_eq!(s.etcd_member[0].id, "m");
    assert_eq!(s.etcd_member[0].status, Status::Full as i32);

    // EscrowResponse.needed=1 [ProofRequest{kind=1 (REFRESH_CERTIFICATE)}].
    let escrow: &[u8] = &[0x0a, 2, 0x08, 1];
    let e = metropolis_api::api::EscrowResponse::decode(escrow).expect("decode escrow");
    assert_eq!(
        e.needed[0].kind(),
        metropolis_api::api::escrow_response::proof_request::Kind::RefreshCertificate
    );
}

#[test]
#[ignore = "regenerates the table from UPSTREAM_DESCRIPTORS; see the module docs"]
fn print_table() {
    let path = std::env::var("UPSTREAM_DESCRIPTORS").expect("UPSTREAM_DESCRIPTORS");
    let bytes = std::fs::read(path).expect("read descriptor set");
    let pool = DescriptorPool::decode(bytes.as_slice()).expect("decode descriptor set");
    for line in describe(&pool, true) {
        println!("{line}");
    }
}
