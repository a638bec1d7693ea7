//! `metroctl user keygen | add | list | remove` and `metroctl login --identity`.
//!
//! Named identities are added by the owner and used by someone else, so the
//! flow has two sides:
//!
//! 1. The holder runs `metroctl user keygen`: the private key stays in their
//!    configuration directory (`identity-key.pem`, mode 0600), the public key
//!    goes to a file (`identity.pub` there, or `-o FILE`) to hand to the
//!    owner. The public key file is one line: the 32-byte Ed25519 public key
//!    as 64 lowercase hex digits.
//! 2. The owner runs `metroctl user add NAME --role ROLE --pubkey FILE`.
//! 3. The holder runs `metroctl login --identity NAME --endpoints IP`: it pins
//!    the cluster CA (trust on first use, as takeownership does), proves the
//!    key through Escrow and stores the certificate as `identity.pem`. From
//!    then on every command of that configuration directory acts as NAME.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use metropolis_api::admin::{
    AddIdentityRequest, Identity, ListIdentitiesRequest, RemoveIdentityRequest, Role,
    cluster_admin_client::ClusterAdminClient,
};

use crate::cmd::confirm;
use crate::config::{CA_CERT, IDENTITY_CERT, IDENTITY_KEY, OWNER_CERT, encode_identity_key_pem};
use crate::conn::{Ctx, call_error};
use crate::output::{self, Format};

/// Default name of the public key file `user keygen` writes.
pub const IDENTITY_PUB: &str = "identity.pub";

#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// Make a key for a named identity (run by its holder); prints the public key for the owner.
    Keygen {
        /// Where to write the public key (default: identity.pub in the configuration directory).
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Add a named identity (owner only); its holder then runs `metroctl login --identity NAME`.
    Add {
        name: String,
        #[arg(long, value_enum)]
        role: RoleArg,
        /// The public key file the holder made with `metroctl user keygen`.
        #[arg(long, value_name = "FILE")]
        pubkey: PathBuf,
    },
    /// Show the identities that can hold certificates (owner only).
    List {
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Remove a named identity (owner only); its certificate stops working at once.
    Remove { name: String },
}

/// `metroctl login`.
#[derive(Args, Debug)]
pub struct LoginArgs {
    /// The identity name the owner added with `metroctl user add`.
    #[arg(long)]
    pub identity: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// Every permission.
    Owner,
    /// Everything but configuring the cluster, deleting nodes, identities and the audit log.
    Operator,
    /// Read cluster status and node logs.
    Reader,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Owner => Role::Owner,
            RoleArg::Operator => Role::Operator,
            RoleArg::Reader => Role::Reader,
        }
    }
}

pub async fn run(ctx: &Ctx, cmd: UserCommand) -> anyhow::Result<()> {
    match cmd {
        UserCommand::Keygen { output } => keygen(ctx, output.as_deref()),
        UserCommand::Add { name, role, pubkey } => add(ctx, &name, role, &pubkey).await,
        UserCommand::List { format } => list(ctx, format).await,
        UserCommand::Remove { name } => remove(ctx, &name).await,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The public key file's contents.
pub fn encode_public_key(key: &[u8; 32]) -> String {
    format!("{}\n", hex(key))
}

/// Parses a public key file: 64 hex digits, surrounding whitespace ignored.
pub fn decode_public_key(text: &str) -> anyhow::Result<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!(
            "expected one line of 64 hex digits (a 32-byte Ed25519 public key, as \
             `metroctl user keygen` writes it)"
        );
    }
    let mut key = [0u8; 32];
    for (i, out) in key.iter_mut().enumerate() {
        *out = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)?;
    }
    metropolis_identity::VerifyingKey::from_bytes(&key)
        .context("the hex digits are not a valid Ed25519 public key")?;
    Ok(key)
}

fn keygen(ctx: &Ctx, output: Option<&Path>) -> anyhow::Result<()> {
    if ctx.config.identity_key()?.is_some()
        && !confirm(
            ctx,
            &format!(
                "{} already holds an identity key; replace it? (certificates for the old key \
                 become useless)",
                ctx.config.path(IDENTITY_KEY).display()
            ),
        )?
    {
        bail!("the existing identity key was kept; nothing was changed");
    }
    let key = metropolis_identity::generate_key();
    ctx.config
        .write(IDENTITY_KEY, encode_identity_key_pem(&key).as_bytes())?;
    // A certificate for the replaced key would only produce confusing
    // PERMISSION_DENIED errors.
    ctx.config.remove(IDENTITY_CERT)?;
    let public = encode_public_key(&key.verifying_key().to_bytes());
    let path = match output {
        Some(p) => {
            std::fs::write(p, &public).with_context(|| format!("writing {}", p.display()))?;
            p.to_path_buf()
        }
        None => {
            ctx.config.write(IDENTITY_PUB, public.as_bytes())?;
            ctx.config.path(IDENTITY_PUB)
        }
    };
    println!("Public key: {}", public.trim());
    println!("Written to {}.", path.display());
    println!(
        "Give that file to the cluster owner, who runs \
         `metroctl user add NAME --role ROLE --pubkey FILE`; then run \
         `metroctl login --identity NAME --endpoints IP`."
    );
    Ok(())
}

async fn add(ctx: &Ctx, name: &str, role: RoleArg, pubkey: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(pubkey)
        .with_context(|| format!("reading the public key file {}", pubkey.display()))?;
    let key = decode_public_key(&text)
        .with_context(|| format!("{} is not a public key file", pubkey.display()))?;
    let mut admin = ClusterAdminClient::new(ctx.owner_channel().await?);
    admin
        .add_identity(AddIdentityRequest {
            name: name.to_string(),
            public_key: key.to_vec(),
            role: Role::from(role) as i32,
        })
        .await
        .map_err(|s| call_error("AddIdentity", s))?;
    println!(
        "Added identity {name} with role {}. Its holder can now run \
         `metroctl login --identity {name} --endpoints IP`.",
        role_name(Role::from(role) as i32)
    );
    Ok(())
}

pub fn role_name(role: i32) -> String {
    match Role::try_from(role) {
        Ok(Role::Owner) => "owner".into(),
        Ok(Role::Operator) => "operator".into(),
        Ok(Role::Reader) => "reader".into(),
        _ => format!("unknown ({role})"),
    }
}

async fn list(ctx: &Ctx, format: Format) -> anyhow::Result<()> {
    let mut admin = ClusterAdminClient::new(ctx.owner_channel().await?);
    let identities: Vec<Identity> = admin
        .list_identities(ListIdentitiesRequest {})
        .await
        .map_err(|s| call_error("ListIdentities", s))?
        .into_inner()
        .identities;
    if format != Format::Table {
        return output::print_structured(format, &identities, false);
    }
    let mut t = output::table();
    t.set_header(vec!["NAME", "ROLE", "CREATED", "PUBLIC KEY"]);
    for i in &identities {
        t.add_row(vec![
            i.name.clone(),
            role_name(i.role),
            if i.bootstrap_owner {
                "(bootstrap owner)".to_string()
            } else {
                i.created_at
                    .as_ref()
                    .map(crate::cmd::audit::format_time)
                    .unwrap_or_default()
            },
            hex(&i.public_key),
        ]);
    }
    println!("{t}");
    Ok(())
}

async fn remove(ctx: &Ctx, name: &str) -> anyhow::Result<()> {
    if !confirm(
        ctx,
        &format!("Remove identity {name}? Its certificate stops working at once."),
    )? {
        bail!("identity {name} was not removed");
    }
    let mut admin = ClusterAdminClient::new(ctx.owner_channel().await?);
    admin
        .remove_identity(RemoveIdentityRequest {
            name: name.to_string(),
        })
        .await
        .map_err(|s| call_error("RemoveIdentity", s))?;
    println!("Removed identity {name}.");
    Ok(())
}

/// `metroctl login --identity NAME`: pins the CA, trades the identity key
/// for a certificate through Escrow, and stores it.
pub async fn login(ctx: &Ctx, args: LoginArgs) -> anyhow::Result<()> {
    let name = args.identity;
    let key = ctx.config.require_identity_key()?;
    if ctx.config.owner_cert()?.is_some() {
        // Commands pick identity credentials over owner ones; mixing both in
        // one directory would silently demote the owner.
        bail!(
            "{} holds owner credentials ({OWNER_CERT}); log in as {name} with a configuration \
             directory of its own (--config DIR)",
            ctx.config.root().display()
        );
    }
    let endpoints = ctx.endpoints()?;
    let (ca, _) = super::takeownership::pinned_or_confirmed_ca(ctx, &endpoints).await?;
    let cert = super::takeownership::escrow(ctx, &ca, &name, &key).await?;
    ctx.config
        .write(CA_CERT, metropolis_identity::cert_to_pem(&ca).as_bytes())?;
    ctx.config.write(
        IDENTITY_CERT,
        metropolis_identity::cert_to_pem(&cert).as_bytes(),
    )?;
    super::takeownership::remember_endpoints(ctx, &endpoints)?;
    println!(
        "Logged in as {name}. Credentials are in {}; commands now act as {name}.",
        ctx.config.root().display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::decode_identity_key_pem;

    #[test]
    fn public_key_files() {
        let key = metropolis_identity::generate_key();
        let public = key.verifying_key().to_bytes();
        let text = encode_public_key(&public);
        assert_eq!(text.len(), 65);
        assert_eq!(decode_public_key(&text).expect("decode"), public);
        assert_eq!(
            decode_public_key(&format!("  {}\n\n", text.to_uppercase())).expect("decode"),
            public
        );
        for bad in ["", "abc", &text[..62], &format!("{}zz", &text[..62])] {
            assert!(decode_public_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn identity_key_pem() {
        let key = metropolis_identity::generate_key();
        let pem = encode_identity_key_pem(&key);
        assert!(pem.starts_with("-----BEGIN METROPOLIS IDENTITY PRIVATE KEY-----\n"));
        assert!(
            pem.trim_end()
                .ends_with("-----END METROPOLIS IDENTITY PRIVATE KEY-----")
        );
        assert_eq!(
            decode_identity_key_pem(&pem).expect("decode").to_bytes(),
            key.to_bytes()
        );
        // An owner key is not an identity key.
        let owner = metropolis_identity::encode_owner_key_pem(&key);
        assert!(decode_identity_key_pem(&owner).is_err());
    }
}
