//! The `leasehold` binary: parse the command line, run the library.

fn main() -> std::process::ExitCode {
    leasehold::cli::main()
}
