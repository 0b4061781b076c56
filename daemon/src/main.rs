//! The `qcow2d` binary: the library's [`qcow2d::main`] on mimalloc.

use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    qcow2d::main()
}
