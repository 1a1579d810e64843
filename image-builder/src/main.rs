//! `tether-image` command line: `build`, `keygen`, `verify`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tether_image::build::{BuildOptions, build, verify_image};
use tether_image::spec::RootfsFormat;
use tether_image::{Error, keys};
use tether_telemetry::LogArgs;

/// Builds the immutable node boot image from a declarative spec.
#[derive(Parser)]
#[command(name = "tether-image", version, about)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build an image from a TOML spec into OUT (replaced only when the build succeeds).
    Build {
        /// The image spec (see image-builder/examples/default.toml).
        spec: PathBuf,
        /// Output directory.
        #[arg(short, long)]
        out: PathBuf,
        /// The tether-agent binary to bake in (overrides the spec).
        #[arg(long)]
        agent: Option<PathBuf>,
        /// The signing key from `tether-image keygen` (overrides the spec).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Rebuild the Debian base tree even if cached (downloaded packages are reused).
        #[arg(long)]
        fresh: bool,
        /// Rootfs format (overrides the spec): squashfs or erofs.
        #[arg(long, value_parser = parse_format)]
        format: Option<RootfsFormat>,
    },
    /// Build the container images nodes need (pause, CoreDNS, kube-proxy, a test shell)
    /// from the pinned binaries and push them to the artifact store at STORE (`host:port`,
    /// e.g. from ConfigMap tether-system/tether-registry).
    Containers {
        /// The artifact store's address.
        #[arg(long)]
        push: String,
        /// Where the layers are assembled.
        #[arg(long, default_value = "/var/tmp/tether-containers")]
        work: PathBuf,
    },
    /// Push the binaries a node installs (kubelet, containerd and its runc shim, runc, the
    /// CNI plugins) from the pinned cache to the artifact store at STORE, each as an OCI
    /// artifact `tether/node/<name>:<version>` whose one layer is the binary.
    NodeArtifacts {
        /// The artifact store's address.
        #[arg(long)]
        push: String,
        /// Where the OCI layouts are written.
        #[arg(long, default_value = "/var/tmp/tether-containers")]
        work: PathBuf,
    },
    /// Verify the built image in DIR and push it to the artifact store at STORE as one OCI
    /// artifact `tether/boot/<name>:<version>`: each file a raw layer whose digest is the
    /// sha256 its manifest and BootImage carry.
    BootArtifacts {
        /// The image directory (`tether-image build -o DIR`).
        dir: PathBuf,
        /// The public key the image must be signed with.
        #[arg(long)]
        public_key: PathBuf,
        /// The artifact store's address.
        #[arg(long)]
        push: String,
        /// Where the OCI layout is written.
        #[arg(long, default_value = "/var/tmp/tether-containers")]
        work: PathBuf,
    },
    /// Make an ed25519 key pair (signing.key, signing.pub) in DIR.
    Keygen {
        /// Directory for the key files.
        dir: PathBuf,
    },
    /// Check an image directory's signature and every artifact's sha256.
    Verify {
        /// The image directory.
        dir: PathBuf,
        /// The public key (signing.pub).
        #[arg(long)]
        public_key: PathBuf,
    },
}

fn parse_format(s: &str) -> Result<RootfsFormat, String> {
    match s {
        "squashfs" => Ok(RootfsFormat::Squashfs),
        "erofs" => Ok(RootfsFormat::Erofs),
        other => Err(format!("{other:?} is not squashfs or erofs")),
    }
}

fn main() {
    let cli = Cli::parse();
    cli.log.init();
    let result: Result<(), Error> = match cli.command {
        Command::Build {
            spec,
            out,
            agent,
            key,
            fresh,
            format,
        } => build(&BuildOptions {
            spec,
            out: out.clone(),
            agent,
            key,
            fresh,
            format,
        })
        .map(|r| {
            let total: f64 = r.steps.iter().map(|(_, s)| s).sum();
            println!("built {} in {total:.1}s", out.display());
        }),
        Command::Containers { push, work } => {
            tether_image::containers::push_all(&push, &tether_upstream::Pins::default(), &work).map(
                |pushed| {
                    for p in pushed {
                        println!("{} {}", p.reference, p.pinned);
                    }
                },
            )
        }
        Command::NodeArtifacts { push, work } => {
            tether_image::node_artifacts::push_all(&push, &tether_upstream::Pins::default(), &work)
                .map(|pushed| {
                    for a in pushed {
                        println!(
                            "{} {} {} bytes, blob {}",
                            a.reference,
                            a.manifest,
                            a.size,
                            a.blob_path()
                        );
                    }
                })
        }
        Command::BootArtifacts {
            dir,
            public_key,
            push,
            work,
        } => keys::read_public_key(&public_key)
            .and_then(|k| tether_image::boot_artifacts::push(&dir, &k, &push, &work))
            .map(|p| {
                println!("{} {}", p.reference, p.manifest);
                for (file, digest) in p.files {
                    println!("  {file} {digest}");
                }
            }),
        Command::Keygen { dir } => keys::keygen(&dir).map(|()| {
            println!("wrote {0}/signing.key and {0}/signing.pub", dir.display());
        }),
        Command::Verify { dir, public_key } => keys::read_public_key(&public_key)
            .and_then(|k| verify_image(&dir, &k))
            .map(|m| {
                println!(
                    "{}: version {} verified ({} artifacts)",
                    dir.display(),
                    m.version,
                    m.artifacts.len()
                )
            }),
    };
    if let Err(e) = result {
        eprintln!("tether-image: {e}");
        std::process::exit(1);
    }
}
