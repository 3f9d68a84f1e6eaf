//! Generates the protobuf messages and the sync ttrpc client/server of proto/agent.proto.
//! Pure Rust (ttrpc-codegen + protobuf-parse): no protoc needed, works offline.
//!
//! The generated files start with inner attributes (`#![allow(..)]`), which `include!` cannot
//! take; they are dropped here and the allowances are put on the including modules instead.
use std::path::Path;
use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    let out = std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo");
    let gen = Path::new(&out).join("gen");
    std::fs::create_dir_all(&gen).expect("create OUT_DIR/gen");
    Codegen::new()
        .out_dir(&gen)
        .input("proto/agent.proto")
        .include("proto")
        .rust_protobuf()
        .customize(Customize::default())
        .rust_protobuf_customize(ProtobufCustomize::default())
        .run()
        .expect("ttrpc codegen of proto/agent.proto");
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let text = std::fs::read_to_string(gen.join(name)).expect("read generated file");
        let kept: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("#![") && !l.trim_start().starts_with("//!"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(Path::new(&out).join(name), kept).expect("write generated file");
    }
}
