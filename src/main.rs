fn main() -> std::process::ExitCode {
    lambdaflow::cli::main()
}
