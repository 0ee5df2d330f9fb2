fn main() -> std::process::ExitCode {
    agent_supervisor::cli::main()
}
