//! Compiles the vendored konnectivity protos (`proto/`, see its README) into gRPC clients. A
//! vendored `protoc` is used so the build needs nothing from the system.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the environment.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        // DATA payloads as `bytes::Bytes`: forwarded without copying.
        .bytes(".")
        .compile_protos(
            &[
                "proto/agent/agent.proto",
                "proto/konnectivity-client/proto/client/client.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
