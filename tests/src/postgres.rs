//! A private PostgreSQL server for a test: Debian's server binaries, a fresh cluster in a
//! temporary directory, listening only on 127.0.0.1 at a free port (and a socket in its own
//! directory), stopped and removed when the value is dropped. `initdb` refuses to run as root,
//! so under root (CI containers) the server runs as the `postgres` user the package creates.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A running server.
pub struct Postgres {
    /// `host=127.0.0.1 port=… user=postgres dbname=postgres` (empty until the server is up).
    pub url: String,
    bin: PathBuf,
    dir: PathBuf,
    /// Run the server's tools as this user (when the test runs as root).
    run_as: Option<&'static str>,
}

/// Set (as `.ci/run` does once it has installed PostgreSQL) to make a missing server a failure
/// instead of a skip.
const REQUIRE: &str = "CARERECORD_REQUIRE_POSTGRES";

impl Postgres {
    /// Starts a server, or says loudly why it cannot and returns `None` (the test then skips),
    /// unless `CARERECORD_REQUIRE_POSTGRES` is set, when it fails.
    pub fn start(name: &str) -> Option<Postgres> {
        match Postgres::try_start(name) {
            Ok(pg) => Some(pg),
            Err(why) => {
                assert!(
                    std::env::var_os(REQUIRE).is_none(),
                    "PostgreSQL is required ({REQUIRE} is set) but could not be started: {why}"
                );
                eprintln!(
                    "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
                     !!! SKIPPED: the PostgreSQL audit store test ({name}) could not start a server:\n\
                     !!! {why}\n\
                     !!! Install Debian's `postgresql` package (`.ci/run` does) to run it.\n\
                     !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
                );
                None
            }
        }
    }

    fn try_start(name: &str) -> Result<Postgres, String> {
        let bin = server_bin().ok_or("no /usr/lib/postgresql/*/bin/initdb")?;
        let root = is_root();
        let run_as = root.then_some("postgres");
        if root && !run(Command::new("id").arg("postgres"))?.status.success() {
            return Err("running as root and there is no `postgres` user to run the server".into());
        }
        let dir = std::env::temp_dir().join(format!(
            "carerecord-pg-{name}-{}-{}",
            std::process::id(),
            free_port()?
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut pg = Postgres {
            url: String::new(),
            bin,
            dir,
            run_as,
        };
        if root {
            pg.check(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&pg.dir),
            )?;
        }
        let data = pg.dir.join("data");
        pg.check(
            pg.tool("initdb")
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--no-locale",
                    "-E",
                    "UTF8",
                ])
                .arg("--no-sync"),
        )?;
        let port = free_port()?;
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off -c max_connections=30 \
             -c shared_buffers=16MB",
            pg.dir.display()
        );
        pg.check(
            pg.tool("pg_ctl")
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(pg.dir.join("server.log"))
                .args(["-o", &options, "-w", "-t", "60", "start"]),
        )?;
        pg.url = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
        Ok(pg)
    }

    /// One of the server's tools, as the user the server runs as.
    fn tool(&self, name: &str) -> Command {
        let path = self.bin.join(name);
        match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    fn check(&self, command: &mut Command) -> Result<(), String> {
        let out = run(command)?;
        if out.status.success() {
            Ok(())
        } else {
            let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
            Err(format!(
                "{command:?} failed: {}{}\n{log}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if !self.url.is_empty() {
            let _ = run(self
                .tool("pg_ctl")
                .arg("-D")
                .arg(self.dir.join("data"))
                .args(["-m", "immediate", "-w", "-t", "30", "stop"]));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(command: &mut Command) -> Result<Output, String> {
    command
        .output()
        .map_err(|e| format!("{:?}: {e}", command.get_program()))
}

/// The newest installed server's `bin` directory.
fn server_bin() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            Path::new(&bin.join("initdb"))
                .exists()
                .then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port: {e}"))
}
