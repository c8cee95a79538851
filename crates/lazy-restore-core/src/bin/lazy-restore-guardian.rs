//! `lazy-restore-guardian`: started by the lazy-restore engine with its socket as fd 3. It
//! holds a reference to every userfaultfd the daemon serves and, if the daemon dies before
//! every page is in, kills the restored tree instead of letting it run on zero pages. See
//! `lazy_restore_core::guardian`.

fn main() {
    std::process::exit(lazy_restore_core::guardian::run());
}
