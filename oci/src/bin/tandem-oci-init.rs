//! A minimal `init_exe` for the engine: re-executed with `INIT_ARG` it becomes a container's
//! init. Used by the integration tests; the shim uses its own binary (`/proc/self/exe`).

fn main() {
    if std::env::args().nth(1).as_deref() == Some(tandem_oci::INIT_ARG) {
        tandem_oci::init_main();
    }
    eprintln!(
        "usage: started by the tandem-oci engine as `{} {}`",
        std::env::args().next().unwrap_or_default(),
        tandem_oci::INIT_ARG
    );
    std::process::exit(2);
}
