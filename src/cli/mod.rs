//! The `replog` command line. One file per subcommand; this one holds the argument
//! definitions and dispatch.

mod data;
mod disk;
mod failover;
mod inspect;
mod jobs;
mod plan;
mod replicate;
mod site;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "replog",
    version,
    about = "Journaled virtual disks, replicated to a second site, restored at any point",
    long_about = None
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a site directory: configuration, identity (key + self-signed
    /// certificate), machines/.
    Init {
        site: PathBuf,
        /// Keep replicas received here in an S3 bucket (s3://BUCKET[/PREFIX]) instead
        /// of SITE/replicas/. Credentials from AWS_ACCESS_KEY_ID /
        /// AWS_SECRET_ACCESS_KEY, or --s3-credentials-file. The store is checked
        /// (reachable, bucket and credentials good, create-if-absent honoured) before
        /// anything is created.
        #[arg(long, value_name = "s3://BUCKET[/PREFIX]")]
        replica_store: Option<String>,
        /// The S3 store's URL (http://127.0.0.1:8333, https://s3.eu-west-1.amazonaws.com).
        #[arg(long, value_name = "URL", requires = "replica_store")]
        s3_endpoint: Option<String>,
        /// The S3 region (default us-east-1).
        #[arg(long, value_name = "R", requires = "replica_store")]
        s3_region: Option<String>,
        /// A file (mode 0600) with access_key_id = "…" and secret_access_key = "…".
        #[arg(long, value_name = "FILE", requires = "replica_store")]
        s3_credentials_file: Option<PathBuf>,
        /// Use a store that ignores create-if-absent (Garage): a stale receiver can
        /// then not be fenced, so run one receiver per replica at any time.
        #[arg(long, requires = "replica_store")]
        s3_unfenced: bool,
    },
    /// Print this site's ID (the SHA-256 fingerprint of its first certificate; the
    /// same after `replog identity rotate`).
    Id { site: PathBuf },
    /// The site's certificate: show it, or rotate it.
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Trust a peer site for mutual TLS: pin its ID (as `replog id` prints it there).
    Trust { site: PathBuf, peer_id: String },
    /// Manage disks.
    #[command(subcommand)]
    Disk(DiskCommand),
    /// Manage machines.
    #[command(subcommand)]
    Machine(MachineCommand),
    /// Write bytes to a disk through the journal (then flush: durable on exit 0).
    Write {
        site: PathBuf,
        /// MACHINE/DISK
        disk: String,
        /// Byte offset to write at (any offset, no alignment needed).
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// File to read the bytes from ("-" for standard input).
        #[arg(long, conflicts_with = "zero")]
        input: Option<PathBuf>,
        /// Instead of data, make this many bytes at OFFSET read as zeros (discard).
        #[arg(long)]
        zero: Option<String>,
    },
    /// Read bytes of a disk as it is now (journal + parent).
    Read {
        site: PathBuf,
        /// MACHINE/DISK
        disk: String,
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Bytes to read (default: to the end of the disk).
        #[arg(long)]
        length: Option<String>,
        /// Output file (sparse: zero blocks become holes); default standard output.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Seal every machine's active segment and merge what may be merged, now.
    Compact {
        site: PathBuf,
        /// Only this machine.
        machine: Option<String>,
    },
    /// Show each machine's state, health with the reason, replication lag, initial-copy
    /// progress, journal size and last point (read from the running `serve` if any;
    /// a serve still opening its machines is waited for up to 5 s).
    Status {
        site: PathBuf,
        machine: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Run the site in the foreground: recover journals, run compactors, replicate
    /// protected machines, receive replicas (--listen) and fold their expired points
    /// into replica parents, mount every disk as DIR/<machine>/<disk>.img and every
    /// replica point read-only as DIR/<machine>/points/<point>/<disk>.img (--mount),
    /// answer `replog checkpoint` on SITE/control.sock. SIGINT/SIGTERM flush, unmount
    /// and exit 0 (1 if a flush fails); a mount still in use is detached and let go
    /// after 10 s.
    Serve {
        site: PathBuf,
        /// Mount the disks here (created if missing; a dead mount left by a killed
        /// serve is detected and cleared).
        #[arg(long)]
        mount: Option<PathBuf>,
        /// Receive replicas from trusted sites on ADDR (host:port).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// FUSE session threads.
        #[arg(long, default_value_t = 4)]
        fuse_threads: usize,
        /// Open disk files with FOPEN_DIRECT_IO (bypass the kernel page cache).
        #[arg(long)]
        direct_io: bool,
        /// Every read of an O_DIRECT opener (a VM with cache=none, fio direct=1) reads
        /// the parent image with O_DIRECT too: no double caching of a guest that
        /// caches for itself; data read again goes to the disk again. By default only
        /// sequential runs do (read ahead into replog's own buffers) and other reads
        /// go through the page cache. Data still in the journal is always read
        /// through the page cache.
        #[arg(long, conflicts_with = "cached_reads")]
        direct_reads: bool,
        /// Every read goes through the page cache, sequential runs of O_DIRECT
        /// openers too (the default before 2026-12-06; it may be faster where free
        /// memory costs nothing to take again: docs/FUSE.md).
        #[arg(long)]
        cached_reads: bool,
        /// Largest FUSE write request in bytes.
        #[arg(long, default_value_t = 1 << 20)]
        max_write: u32,
        /// Do not ask for FUSE_ASYNC_DIO.
        #[arg(long)]
        no_async_dio: bool,
        /// Hand writes to N worker threads that append and reply while the session
        /// threads read the next requests (0: session threads write themselves).
        #[arg(long, default_value_t = 0)]
        write_workers: usize,
        /// Asynchronous FUSE requests (direct I/O pieces, readahead) the kernel keeps
        /// in flight to this mount (the kernel's own default is 12); the congestion
        /// threshold is set to 3/4 of it.
        #[arg(long, default_value_t = replog::frontend::FrontendOptions::default().max_background)]
        max_background: u16,
        /// Serve Prometheus metrics (OpenMetrics text) at http://ADDR/metrics: per
        /// machine lag, health, journal bytes, shipped bytes and segments, acknowledged
        /// LSN, resync progress, retries, failovers; FUSE and fsync latency, TLS
        /// sessions, replica store requests.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
        /// How log lines on standard error look: `text` for people, `json` (one object
        /// a line: timestamp, level, target, fields) for log collectors.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Enable protection of MACHINE toward the target site at ADDR: checks the machine,
    /// that the target is reachable and trusted both ways and has room, then records
    /// the relationship; a running `serve` starts initial replication within a second.
    Protect {
        site: PathBuf,
        machine: String,
        /// The target site's `serve --listen` address (host:port).
        #[arg(long)]
        target: String,
        #[command(flatten)]
        settings: RelationshipArgs,
    },
    /// Change a protected machine's bandwidth limit without protecting it again (the
    /// next shipping pass takes it up): RATE (e.g. 20MiB/s or unlimited) and/or
    /// --schedule RULES ("" removes the schedule).
    Bandwidth {
        site: PathBuf,
        machine: String,
        rate: Option<String>,
        #[arg(long, value_name = "RULES")]
        schedule: Option<String>,
    },
    /// Pause shipping of MACHINE to its target (initial copy and resync included)
    /// until `replog resume`: a running serve stops once the pass in progress ends (an
    /// initial copy between chunks, a resync between batches, going on from there
    /// when resumed; up to 30 s is waited for), and the pause is kept in the
    /// relationship, so a serve started later keeps it. Writes go on; the journal
    /// keeps what the target lacks and grows. Once the initial copy is complete, a
    /// journal that reaches the resync threshold (replication.resync_threshold_percent
    /// of the disks) makes a resync required, and is then merged. `status` says
    /// paused. A planned failover is refused while paused.
    Pause { site: PathBuf, machine: String },
    /// Resume shipping of MACHINE paused by `replog pause`: at once with a running
    /// serve, else when one starts.
    Resume { site: PathBuf, machine: String },
    /// Record a recovery point of MACHINE now (through the running `serve`, or by
    /// opening the site when none runs): crash-consistent, or with --app-consistent
    /// marked app-consistent; prints its ID.
    Checkpoint {
        site: PathBuf,
        machine: String,
        /// Mark the point app-consistent (the applications' data is complete on disk).
        #[arg(long)]
        app_consistent: bool,
        /// Freeze the file system mounted at MOUNTPOINT (FIFREEZE) around the
        /// checkpoint, so everything it holds is on the disk; it is always thawed.
        #[arg(long, value_name = "MOUNTPOINT", requires = "app_consistent")]
        freeze: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Resynchronise a protected machine with its replica: compare chunks (SHA-256)
    /// at both ends and send only those that differ. Marks a resync required; it runs
    /// in the resync window (replication.resync_window, local time) or, with --now, at
    /// once — and with --now a running serve starts again a shipping loop a Critical
    /// error stopped (after `replog accept-loss` at the target, say; not for a machine
    /// fenced or failed over). `replog status`
    /// shows progress, chunks compared and bytes sent.
    Resync {
        site: PathBuf,
        machine: String,
        /// Start at once instead of waiting for the window.
        #[arg(long)]
        now: bool,
    },
    /// At a target site: list, and with --yes give up, the ranges of MACHINE's replica
    /// that no copy is left of. A resync that finds the replica's own copy of a range
    /// damaged drops it; if the source's copy is damaged too, its mend is refused ("the
    /// replica lost them too") and the machine stays stopped. Given up, the replica
    /// serves those ranges as zeroes (older bytes where a fold stopped), and the
    /// source's resync writes them over its own copy of every range it asks for — all
    /// of them where its damage was found when it opened, even where its own older
    /// bytes were intact; then `replog resync SOURCE-SITE MACHINE --now` at the source
    /// (its serve running: the stopped shipping loop starts again) mends its damage and
    /// the machine takes writes again. Recorded as an
    /// `accept-loss` job naming every range. Exit 1 if no resync of MACHINE is under way
    /// here or it lists none.
    AcceptLoss {
        site: PathBuf,
        machine: String,
        /// Give the ranges up (without it: list them, change nothing).
        #[arg(long)]
        yes: bool,
        #[arg(long)]
        json: bool,
    },
    /// Write every disk of a replica held at this (target) site as DIR/<disk>.img
    /// (sparse raw images), at a recovery point, and check each against the source's
    /// digest at that point (a mismatch fails, nothing is kept). Works while `serve`
    /// runs; on any error nothing is written to DIR.
    Restore {
        site: PathBuf,
        machine: String,
        /// The recovery point: `latest`, an LSN, an RFC 3339 time (the newest point at
        /// or before it), or a point ID from `replog points` (an `orphan-…` point too, or
        /// a plan point `pp-…`: this machine's point of it).
        #[arg(long, default_value = "latest")]
        at: String,
        /// Directory for the images (created; existing images are not overwritten).
        #[arg(long)]
        out: PathBuf,
        /// No progress bar, a JSON summary.
        #[arg(long)]
        json: bool,
    },
    /// List the recovery points of a replica held at this (target) site that its
    /// retention keeps: every flush, segment seal and checkpoint received, with ID,
    /// LSN, time and kind (a long list is summarised; --json has all).
    Points {
        site: PathBuf,
        machine: String,
        #[arg(long)]
        json: bool,
        /// Remove orphan point POINT (kept by a reprotect: the old primary's own
        /// last state); only orphan points are removed this way.
        #[arg(long, value_name = "POINT")]
        remove: Option<String>,
    },
    /// Show the site's jobs — protect, initial replication, resync, restore,
    /// failovers, reprotects, plan runs, accepted losses: newest first with their state; with JOB, its
    /// steps; --json: every field.
    Jobs {
        site: PathBuf,
        /// A job ID (`j-…`) as the list shows it.
        job: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Fail MACHINE over. At the primary, --planned: refuse writes (EROFS), ship
    /// everything and have it acknowledged, the target promotes at the last LSN (zero
    /// loss; this site becomes failed-over). At the target, with no mode: an
    /// unplanned failover to --at POINT (default latest): the replica becomes a
    /// writable machine of this site at once (nothing copied), commit pending. --test:
    /// an isolated writable copy of the point named --as (default MACHINE-test);
    /// replication goes on. Before commit: --change-point POINT, --cancel (unplanned
    /// only). --cleanup-test removes a test copy. Exit 0 done (verified), 1 failed
    /// (nothing changed unless it says so), 2 usage.
    Failover {
        site: PathBuf,
        machine: String,
        /// At the primary: zero-loss failover to its target.
        #[arg(long, group = "mode")]
        planned: bool,
        /// At the target: an isolated writable copy of the point.
        #[arg(long, group = "mode")]
        test: bool,
        /// At the target: remove a test copy (--as NAME; default MACHINE-test).
        #[arg(long, group = "mode")]
        cleanup_test: bool,
        /// Before commit: move the failover to POINT (writes made since are dropped).
        #[arg(long, group = "mode", value_name = "POINT")]
        change_point: Option<String>,
        /// Before commit: undo an unplanned failover (the machine is a replica again).
        #[arg(long, group = "mode")]
        cancel: bool,
        /// The point: latest, latest-app-consistent, an LSN, an RFC 3339 time, a point
        /// ID from `replog points`, or a plan point `pp-…` (this machine's point of it).
        #[arg(long, value_name = "POINT", conflicts_with_all = ["planned", "cleanup_test", "change_point", "cancel"])]
        at: Option<String>,
        /// The test copy's name (default MACHINE-test).
        #[arg(long = "as", value_name = "NAME", conflicts_with_all = ["planned", "change_point", "cancel"])]
        as_name: Option<String>,
        /// A note kept in the cleanup job (what the test found).
        #[arg(long, requires = "cleanup_test")]
        note: Option<String>,
        /// Unplanned: first ask the primary to shut down — at its next connection it
        /// fences its writes, ships everything and has the machine promoted here (a
        /// planned failover, nothing lost); if it has not within --shutdown-timeout,
        /// promote at the newest point. Needs this site's `serve --listen` running.
        #[arg(long, conflicts_with_all = ["planned", "test", "cleanup_test", "change_point", "cancel", "at"])]
        shutdown_source: bool,
        /// Seconds to wait for the primary with --shutdown-source.
        #[arg(long, default_value_t = 30, requires = "shutdown_source")]
        shutdown_timeout: u64,
        /// A JSON summary (the job's ID, the point), no progress.
        #[arg(long)]
        json: bool,
    },
    /// Replicate MACHINE (promoted here and committed) toward the site at --target:
    /// its old primary becomes the replica from its own disks and only the blocks that
    /// differ travel (its unshipped tail is kept there as an `orphan` point); another
    /// site gets a full initial copy. Refused: a machine not committed, this site, an
    /// untrusted site, a site holding a newer generation. Waits for the job while
    /// serve runs (--no-wait: return at once).
    Reprotect {
        site: PathBuf,
        machine: String,
        /// The target site's `serve --listen` address (host:port).
        #[arg(long)]
        target: String,
        #[command(flatten)]
        settings: RelationshipArgs,
        /// Return once the relationship is recorded.
        #[arg(long)]
        no_wait: bool,
    },
    /// Make MACHINE's failover final: the replica's other points go, its parents
    /// become local files, and it is a primary of this site (unprotected).
    Commit {
        site: PathBuf,
        machine: String,
        #[arg(long)]
        json: bool,
    },
    /// Recovery plans: machines in ordered groups, failed over as one operation with
    /// programs and manual steps before and after each group.
    #[command(subcommand)]
    Plan(PlanCommand),
    /// Dump and verify a site, machine, journal directory or segment file; exit 1 on
    /// corruption, naming the file and offset.
    Inspect {
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Check the site's settings.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print shell completions for SHELL (bash, zsh, fish, elvish, powershell) to
    /// standard output, e.g. `replog completions bash > /etc/bash_completion.d/replog`.
    Completions { shell: clap_complete::Shell },
    /// Print the manual page (roff) to standard output, e.g.
    /// `replog man > /usr/local/share/man/man1/replog.1`; with COMMAND, that
    /// command's page (`replog man serve > …/replog-serve.1`).
    Man { command: Option<String> },
}

/// Write `bytes` to standard output (a reader that went away is not an error).
fn print_bytes(bytes: &[u8]) -> replog::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.map_err(|e| replog::Error::io("write", std::path::Path::new("-"), e)),
    }
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate site.toml and every machine's relationship file: unknown keys and bad
    /// values are reported with file, line and key (serve refuses to start with the
    /// same message). Exit 0 all good, 1 otherwise.
    Check { site: PathBuf },
}

/// `serve --log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl Cli {
    /// Whether log lines are to be JSON (`serve --log-format json`).
    pub fn json_logs(&self) -> bool {
        matches!(
            self.command,
            Command::Serve {
                log_format: LogFormat::Json,
                ..
            }
        )
    }
}

#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Validate a plan file against this site and store it.
    ///
    /// FILE is TOML: name, 1-7 [[group]]s of machines, actions
    /// [[group.before]] / [[group.after]] with `run` + `timeout` + `on`, or `manual`)
    /// against this site and store it. Every machine must be a primary or a replica
    /// here; add the plan at each site that will run it. A bad plan is refused naming
    /// the line and the key; nothing is stored.
    Add {
        site: PathBuf,
        file: PathBuf,
        /// Replace a stored plan of the same name (refused while a run of it is
        /// unfinished).
        #[arg(long)]
        replace: bool,
    },
    /// List the plans stored here, with their last run.
    List {
        site: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show a plan: its groups, actions and runs.
    Show {
        site: PathBuf,
        plan: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a plan (refused while a run of it is unfinished).
    Remove { site: PathBuf, plan: String },
    /// Fail the plan's machines over, group by group (--dry-run: check only).
    ///
    /// Before-actions in order, the
    /// group's machines side by side, group N+1 once every machine of group N is up
    /// (its disks under serve's mount), then after-actions. Needs this site's serve.
    /// Exit 0: every machine up (verified), or paused at a manual step (job
    /// `waiting`; it prints how to resume); 1: failed (planned and test runs stop at
    /// the first failure and can be resumed; unplanned runs go on to the end and list
    /// every failure). Actions get REPLOG_SITE, REPLOG_PLAN, REPLOG_GROUP (1-based),
    /// REPLOG_FAILOVER, REPLOG_MACHINES (space-separated), REPLOG_MOUNT, REPLOG_JOB.
    #[command(group(clap::ArgGroup::new("kind").required(true).args(["planned", "unplanned", "test"])))]
    Failover {
        site: PathBuf,
        plan: String,
        /// At the primary site: zero-loss failovers to the target.
        #[arg(long)]
        planned: bool,
        /// At the target: the source site is lost.
        #[arg(long)]
        unplanned: bool,
        /// At the target: isolated test copies (MACHINE-test); replication goes on.
        #[arg(long)]
        test: bool,
        /// The point: latest (default), latest-app-consistent, plan-point (the newest
        /// plan point every machine keeps; see `plan checkpoint`) or a plan point ID
        /// (pp-…).
        #[arg(long, value_name = "POINT", conflicts_with = "planned")]
        at: Option<String>,
        /// Check everything a run needs (serve and its mount, machines and roles, for
        /// a planned run their replication's health, no unfinished run, points,
        /// programs executable); print the steps and an estimate; change nothing,
        /// run no program. Exit 1 when a check fails.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Go on with the plan's newest unfinished run.
    ///
    /// After a manual step, a stop at a
    /// failure (the failed step runs again), or a crash of the command that ran it.
    Resume {
        site: PathBuf,
        plan: String,
        #[arg(long)]
        json: bool,
    },
    /// Give up the plan's unfinished run (waiting, stopped or interrupted; a test run
    /// is ended by cleanup-test instead): its job is cancelled, a program it left
    /// running is killed, the machines it failed over stay as they are (listed).
    Abandon {
        site: PathBuf,
        plan: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove every test copy that the plan's newest test run made.
    CleanupTest {
        site: PathBuf,
        plan: String,
        #[arg(long)]
        json: bool,
    },
    /// Commit every machine of the plan that has a failover pending here.
    Commit {
        site: PathBuf,
        plan: String,
        #[arg(long)]
        json: bool,
    },
    /// Take a plan point: one point per machine of the plan at one barrier.
    ///
    /// At the primary site: hold writes to every machine of the plan at one barrier,
    /// record one point in each under a shared plan-point ID (pp-…), release them;
    /// prints how long writes were held. `plan failover --at plan-point` at the target
    /// fails over to the newest plan point every machine keeps.
    Checkpoint {
        site: PathBuf,
        plan: String,
        /// Mark the points app-consistent.
        #[arg(long)]
        app_consistent: bool,
        /// Freeze the file system mounted at MOUNTPOINT (FIFREEZE) around the plan
        /// point (repeat for each); always thawed.
        #[arg(long, value_name = "MOUNTPOINT", requires = "app_consistent")]
        freeze: Vec<PathBuf>,
        /// Give up, recording nothing, if writes cannot all be held within this long.
        #[arg(long, default_value = "5s")]
        max_pause: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum MachineCommand {
    /// Close MACHINE (a running serve stops its loops and it vanishes from the mount)
    /// and delete it: its disks and journal. Refused for a protected machine.
    Remove { site: PathBuf, machine: String },
}

/// What `protect` and `reprotect` record in the machine's relationship.
#[derive(Debug, clap::Args)]
pub struct RelationshipArgs {
    /// How long the target keeps every recovery point (e.g. 24h, 90m, 30s).
    #[arg(long, default_value = "24h")]
    retention: String,
    /// How long the target keeps app-consistent points (at least --retention).
    #[arg(long, default_value = "72h")]
    app_retention: String,
    /// The recovery point objective (e.g. 30s, 5m): replication lag beyond it makes
    /// the machine Warning, beyond twice it Critical, with the reason (status and
    /// metrics).
    #[arg(long, value_name = "DURATION")]
    rpo: Option<String>,
    /// The most this machine sends per second (e.g. 50MiB/s, 800kB/s — kB, MB, GB
    /// are powers of ten, KiB, MiB, GiB of two; default unlimited): initial
    /// replication, shipping, resync and reprotect alike.
    /// `replog bandwidth` changes it later.
    #[arg(long, value_name = "RATE")]
    bandwidth: Option<String>,
    /// Rates by local time over --bandwidth, the first rule that matches wins:
    /// "Mon-Fri 08:00-18:00=10MiB/s, Sat-Sun=50MiB/s, *=unlimited".
    #[arg(long, value_name = "RULES")]
    bandwidth_schedule: Option<String>,
}

impl RelationshipArgs {
    fn settings(&self) -> replicate::Settings<'_> {
        replicate::Settings {
            retention: &self.retention,
            app_retention: &self.app_retention,
            rpo: self.rpo.as_deref(),
            bandwidth: self.bandwidth.as_deref(),
            bandwidth_schedule: self.bandwidth_schedule.as_deref(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// The site's ID, the certificate it presents now, when that ends, and how many
    /// rotations it has made.
    Show {
        site: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Replace the site's key and certificate: the new certificate is signed by the
    /// old key, which is then destroyed, and the old certificate goes on being
    /// presented after the new one, so peers keep trusting the site (its ID does not
    /// change) with no step on their side. Stop the site's serve first.
    Rotate {
        site: PathBuf,
        /// How long the new certificate is valid, 1 to 36500 (default: until the
        /// year 4096).
        #[arg(long, value_name = "DAYS", value_parser = clap::value_parser!(u32).range(1..=36500))]
        valid_days: Option<u32>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Create a disk (and its machine, if new): a sparse parent image of SIZE bytes,
    /// or a copy of a raw image whose holes and zero blocks stay holes. With a serve
    /// running, it creates the disk and shows it under the mount at once. Refused for
    /// a protected machine (its replica has the disks it had then).
    Create {
        site: PathBuf,
        /// MACHINE/DISK: each name 1-64 ASCII letters, digits, '.', '_', '-', not
        /// starting with '.' or '-'
        disk: String,
        /// Size: bytes, or with K/M/G/T (binary); a multiple of 512, at most 64T.
        #[arg(long)]
        size: String,
        /// Raw image file to copy into the new disk (a regular file, at most SIZE bytes;
        /// holes and zero blocks stay holes).
        #[arg(long)]
        import: Option<PathBuf>,
    },
    /// List machines and disks.
    List { site: PathBuf },
}

fn run_plan(cmd: PlanCommand) -> replog::Result<()> {
    match cmd {
        PlanCommand::Add {
            site,
            file,
            replace,
        } => plan::add(&site, &file, replace),
        PlanCommand::List { site, json } => plan::list(&site, json),
        PlanCommand::Show { site, plan, json } => plan::show(&site, &plan, json),
        PlanCommand::Remove { site, plan } => plan::remove(&site, &plan),
        PlanCommand::Failover {
            site,
            plan,
            planned,
            unplanned: _,
            test,
            at,
            dry_run,
            json,
        } => {
            let kind = if planned {
                replog::protection::FailoverKind::Planned
            } else if test {
                replog::protection::FailoverKind::Test
            } else {
                replog::protection::FailoverKind::Unplanned
            };
            plan::failover(&site, &plan, kind, at.as_deref(), dry_run, json)
        }
        PlanCommand::Resume { site, plan, json } => plan::resume(&site, &plan, json),
        PlanCommand::Abandon { site, plan, json } => plan::abandon(&site, &plan, json),
        PlanCommand::CleanupTest { site, plan, json } => plan::cleanup_test(&site, &plan, json),
        PlanCommand::Commit { site, plan, json } => plan::commit(&site, &plan, json),
        PlanCommand::Checkpoint {
            site,
            plan,
            app_consistent,
            freeze,
            max_pause,
            json,
        } => plan::checkpoint(&site, &plan, app_consistent, &freeze, &max_pause, json),
    }
}

/// Run a parsed command line; errors are printed and become exit code 1.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Init {
            site,
            replica_store,
            s3_endpoint,
            s3_region,
            s3_credentials_file,
            s3_unfenced,
        } => site::init(
            &site,
            site::StoreArgs {
                replica_store,
                s3_endpoint,
                s3_region,
                s3_credentials_file,
                s3_unfenced,
            },
        ),
        Command::Id { site } => site::id(&site),
        Command::Identity(IdentityCommand::Show { site, json }) => site::identity_show(&site, json),
        Command::Identity(IdentityCommand::Rotate { site, valid_days }) => {
            site::identity_rotate(&site, valid_days)
        }
        Command::Trust { site, peer_id } => site::trust(&site, &peer_id),
        Command::Disk(DiskCommand::Create {
            site,
            disk,
            size,
            import,
        }) => disk::create(&site, &disk, &size, import.as_deref()),
        Command::Disk(DiskCommand::List { site }) => disk::list(&site),
        Command::Machine(MachineCommand::Remove { site, machine }) => {
            disk::remove_machine(&site, &machine)
        }
        Command::Write {
            site,
            disk,
            offset,
            input,
            zero,
        } => data::write(&site, &disk, offset, input.as_deref(), zero.as_deref()),
        Command::Read {
            site,
            disk,
            offset,
            length,
            output,
        } => data::read(&site, &disk, offset, length.as_deref(), output.as_deref()),
        Command::Compact { site, machine } => site::compact(&site, machine.as_deref()),
        Command::Status {
            site,
            machine,
            json,
        } => site::status(&site, machine.as_deref(), json),
        Command::Inspect { path, json } => return inspect::run(&path, json),
        Command::Config(ConfigCommand::Check { site }) => return site::config_check(&site),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "replog", &mut out);
            print_bytes(&out)
        }
        Command::Man { command } => {
            use clap::CommandFactory;
            let top = Cli::command();
            let page = match &command {
                None => Ok(top),
                Some(name) => top
                    .find_subcommand(name)
                    .map(|c| c.clone().name(format!("replog-{name}")))
                    .ok_or_else(|| {
                        replog::Error::InvalidInput(format!("replog has no command {name:?}"))
                    }),
            };
            page.and_then(|page| {
                let mut out = Vec::new();
                clap_mangen::Man::new(page)
                    .render(&mut out)
                    .map_err(|e| replog::Error::io("render", std::path::Path::new("man"), e))?;
                print_bytes(&out)
            })
        }
        Command::Plan(cmd) => run_plan(cmd),
        Command::Failover {
            site,
            machine,
            planned,
            test,
            cleanup_test,
            change_point,
            cancel,
            at,
            as_name,
            note,
            shutdown_source,
            shutdown_timeout,
            json,
        } => {
            let mode = if planned {
                failover::Mode::Planned
            } else if test {
                failover::Mode::Test
            } else if cleanup_test {
                failover::Mode::CleanupTest
            } else if let Some(p) = change_point {
                failover::Mode::ChangePoint(p)
            } else if cancel {
                failover::Mode::Cancel
            } else {
                failover::Mode::Unplanned {
                    shutdown_source: shutdown_source.then_some(shutdown_timeout),
                }
            };
            failover::run(
                &site,
                &machine,
                mode,
                at.as_deref(),
                as_name.as_deref(),
                note.as_deref(),
                json,
            )
        }
        Command::Reprotect {
            site,
            machine,
            target,
            settings,
            no_wait,
        } => replicate::reprotect(&site, &machine, &target, settings.settings(), !no_wait),
        Command::Commit {
            site,
            machine,
            json,
        } => failover::commit(&site, &machine, json),
        Command::Jobs { site, job, json } => jobs::show(&site, job.as_deref(), json),
        Command::Points {
            site,
            machine,
            json,
            remove: Some(id),
        } => {
            let _ = json;
            replicate::remove_point(&site, &machine, &id)
        }
        Command::Points {
            site,
            machine,
            json,
            remove: None,
        } => replicate::points(&site, &machine, json),
        Command::Protect {
            site,
            machine,
            target,
            settings,
        } => replicate::protect(&site, &machine, &target, settings.settings()),
        Command::Bandwidth {
            site,
            machine,
            rate,
            schedule,
        } => replicate::bandwidth(&site, &machine, rate.as_deref(), schedule.as_deref()),
        Command::Resync { site, machine, now } => replicate::resync(&site, &machine, now),
        Command::Pause { site, machine } => replicate::pause(&site, &machine, true),
        Command::Resume { site, machine } => replicate::pause(&site, &machine, false),
        Command::AcceptLoss {
            site,
            machine,
            yes,
            json,
        } => replicate::accept_loss(&site, &machine, yes, json),
        Command::Checkpoint {
            site,
            machine,
            app_consistent,
            freeze,
            json,
        } => replicate::checkpoint(&site, &machine, app_consistent, freeze.as_deref(), json),
        Command::Restore {
            site,
            machine,
            at,
            out,
            json,
        } => replicate::restore(&site, &machine, &at, &out, json),
        Command::Serve {
            site,
            mount,
            listen,
            fuse_threads,
            direct_io,
            direct_reads,
            cached_reads,
            max_write,
            no_async_dio,
            write_workers,
            max_background,
            metrics,
            log_format: _,
        } => {
            let opts = replog::serve::ServeOptions {
                mount,
                listen,
                metrics,
                fuse_threads,
                frontend: replog::frontend::FrontendOptions {
                    max_write,
                    async_dio: !no_async_dio,
                    direct_io,
                    reads: if direct_reads {
                        replog::frontend::ReadPath::Direct
                    } else if cached_reads {
                        replog::frontend::ReadPath::Cached
                    } else {
                        replog::frontend::ReadPath::Sequential
                    },
                    write_workers,
                    max_background,
                    ..Default::default()
                },
            };
            replog::serve::serve(&site, &opts, || {})
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replog: {e}");
            ExitCode::from(1)
        }
    }
}
