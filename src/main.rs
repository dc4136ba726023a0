//! Dispatch only: pick the role from argv[0] and CNI_COMMAND, run it, exit with its code.

fn main() -> std::process::ExitCode {
    let argv0 = std::env::args_os().next();
    let role = headcni::Role::detect(argv0.as_deref(), std::env::var_os("CNI_COMMAND").is_some());
    let code = headcni::run(role);
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}
