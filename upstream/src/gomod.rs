//! Turning an upstream go.mod into the go.mod of a wrapper module that builds it.
//!
//! Upstream repositories replace their sibling modules with local paths (`=> ./staging/...`,
//! `=> ../api`), which `go install module@version` refuses. The ordinary fix is a small
//! module of ours that requires the upstream module and carries the same requirements, with
//! each local replace turned into the sibling's published version. This is that rewrite, as a
//! pure function.

use crate::pins::Module;

/// Rewrites `upstream` (the text of `module`'s go.mod at `version`) into the go.mod of a
/// wrapper module that requires it.
pub fn rewrite_go_mod(upstream: &str, module: Module, version: &str) -> String {
    let sibling = module.sibling_version(version);
    let mut out = Vec::new();
    let mut in_replace_block = false;
    for line in upstream.lines() {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix("module ") {
            let _ = rest;
            out.push(format!(
                "module tether.dev/upstream-build/{}",
                module.slug()
            ));
            continue;
        }
        if trimmed.starts_with("toolchain ") {
            // The installed toolchain builds it; never let Go fetch another one.
            continue;
        }
        if trimmed == "replace (" {
            in_replace_block = true;
            out.push(line.to_string());
            continue;
        }
        if in_replace_block && trimmed == ")" {
            in_replace_block = false;
            out.push(line.to_string());
            continue;
        }
        let directive = if in_replace_block {
            Some(trimmed)
        } else {
            trimmed.strip_prefix("replace ")
        };
        match directive.and_then(|d| rewrite_replace(d, &sibling)) {
            Some(Rewrite::Drop) => continue,
            Some(Rewrite::Line(new)) => {
                out.push(if in_replace_block {
                    format!("\t{new}")
                } else {
                    format!("replace {new}")
                });
            }
            None => out.push(line.to_string()),
        }
    }
    out.push(String::new());
    out.push(format!("require {} {version}", module.path()));
    out.push(String::new());
    out.join("\n")
}

enum Rewrite {
    Drop,
    Line(String),
}

/// Rewrites one replace directive (without the `replace` keyword) when its target is a
/// local path; `None` leaves it as it is.
fn rewrite_replace(directive: &str, sibling: &str) -> Option<Rewrite> {
    let directive = directive.split("//").next()?.trim();
    let (left, right) = directive.split_once("=>")?;
    let target = right.split_whitespace().next()?;
    if !(target.starts_with("./") || target.starts_with("../")) {
        return None;
    }
    if target.contains("FORBIDDEN_DEPENDENCY") {
        // etcd's guard against importing its own test modules: nothing to replace.
        return Some(Rewrite::Drop);
    }
    let path = left.split_whitespace().next()?;
    Some(Rewrite::Line(format!("{path} => {path} {sibling}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_staging_replaces_become_versions() {
        let upstream = "module k8s.io/kubernetes\n\ngo 1.26.0\n\ngodebug default=go1.26\n\nrequire (\n\tk8s.io/api v0.0.0\n)\n\nreplace (\n\tk8s.io/api => ./staging/src/k8s.io/api\n\tgithub.com/x/y => github.com/x/y v1.0.0\n)\n";
        let got = rewrite_go_mod(upstream, Module::Kubernetes, "v1.36.3");
        assert!(got.starts_with("module tether.dev/upstream-build/kubernetes\n"));
        assert!(got.contains("\tk8s.io/api => k8s.io/api v0.36.3\n"));
        assert!(got.contains("\tgithub.com/x/y => github.com/x/y v1.0.0\n"));
        assert!(got.contains("godebug default=go1.26"));
        assert!(got.ends_with("require k8s.io/kubernetes v1.36.3\n"));
    }

    #[test]
    fn etcd_relative_and_forbidden_replaces() {
        let upstream = "module go.etcd.io/etcd/server/v3\n\ngo 1.26.0\n\ntoolchain go1.26.10\n\nreplace (\n\tgo.etcd.io/etcd/api/v3 => ../api\n\tgo.etcd.io/etcd/pkg/v3 => ../pkg // keep in sync\n)\n\nreplace go.etcd.io/etcd => ./FORBIDDEN_DEPENDENCY\nreplace go.etcd.io/etcd/client/v3 v3.0.0 => ../client/v3\n";
        let got = rewrite_go_mod(upstream, Module::EtcdServer, "v3.6.16");
        assert!(!got.contains("toolchain"));
        assert!(!got.contains("FORBIDDEN"));
        assert!(got.contains("\tgo.etcd.io/etcd/api/v3 => go.etcd.io/etcd/api/v3 v3.6.16\n"));
        assert!(got.contains("\tgo.etcd.io/etcd/pkg/v3 => go.etcd.io/etcd/pkg/v3 v3.6.16\n"));
        assert!(
            got.contains(
                "replace go.etcd.io/etcd/client/v3 => go.etcd.io/etcd/client/v3 v3.6.16\n"
            )
        );
        assert!(got.contains("require go.etcd.io/etcd/server/v3 v3.6.16"));
    }

    #[test]
    fn no_replaces_is_just_a_rename() {
        let upstream =
            "module github.com/k3s-io/kine\n\ngo 1.26.5\n\nrequire github.com/a/b v1.2.3\n";
        let got = rewrite_go_mod(upstream, Module::Kine, "v0.17.5");
        assert_eq!(
            got,
            "module tether.dev/upstream-build/kine\n\ngo 1.26.5\n\nrequire github.com/a/b v1.2.3\n\nrequire github.com/k3s-io/kine v0.17.5\n"
        );
    }
}
