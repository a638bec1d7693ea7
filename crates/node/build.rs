//! Build information for `--version` and the version a node reports: the
//! git commit the binary was built from, when built in a git checkout. A
//! build outside one (a source tarball) reports the crate version alone.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8(out.stdout).ok()?.trim().to_string())
}

fn main() {
    let version = env!("CARGO_PKG_VERSION");
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).filter(|c| !c.is_empty());
    let dirty = commit.is_some()
        && git(&[
            "--no-optional-locks",
            "status",
            "--porcelain",
            "--untracked-files=no",
        ])
        .is_some_and(|s| !s.is_empty());
    let full = match &commit {
        Some(c) if dirty => format!("{version}-g{c}-dirty"),
        Some(c) => format!("{version}-g{c}"),
        None => version.to_string(),
    };
    println!(
        "cargo:rustc-env=METROPOLIS_GIT_COMMIT={}",
        commit.as_deref().unwrap_or("")
    );
    println!("cargo:rustc-env=METROPOLIS_GIT_DIRTY={dirty}");
    println!("cargo:rustc-env=METROPOLIS_VERSION={full}");
    // A commit moves HEAD (or the branch it names, logged in logs/HEAD);
    // staging changes rewrites the index. Naming files that exist only: a
    // missing one would rerun this script on every build.
    println!("cargo:rerun-if-changed=build.rs");
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        for f in ["HEAD", "logs/HEAD", "index"] {
            let p = Path::new(&dir).join(f);
            if p.exists() {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
}
