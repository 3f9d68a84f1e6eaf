//! containerd-shim-tandem-v2
fn main() {
    if std::env::args().nth(1).as_deref() == Some(tandem_oci::INIT_ARG) {
        tandem_oci::init_main();
    }
}
