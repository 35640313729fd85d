// jemalloc, not glibc's malloc: the batch layer's runs allocate and free
// large transient buffers on short-lived blocking threads, and glibc's
// per-thread arenas kept that memory resident, a slow creep over hours (see
// `lambdaflow::memory`). Test binaries keep the system allocator.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    lambdaflow::cli::main()
}
