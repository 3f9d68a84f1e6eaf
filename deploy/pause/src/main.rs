//! tandem-pause: the process that holds a pod sandbox's namespaces.
//!
//! It sleeps until SIGINT or SIGTERM (then exits 0) and, as pid 1 of a pod whose containers share
//! its pid namespace, reaps every orphan re-parented to it. Signals are taken synchronously with
//! sigwaitinfo: no handler and no polling. Built static (`deploy/images/build-pause.sh`) so that
//! the image holds this one file.

fn main() {
    // SAFETY: plain libc calls on a local, zero-initialised sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGCHLD] {
            libc::sigaddset(&mut set, sig);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        loop {
            match libc::sigwaitinfo(&set, std::ptr::null_mut()) {
                libc::SIGINT | libc::SIGTERM => std::process::exit(0),
                libc::SIGCHLD => {
                    while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {}
                }
                _ => {}
            }
        }
    }
}
