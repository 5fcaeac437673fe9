//! Recovery plans through real serves, real TLS on 127.0.0.1 and real FUSE mounts at
//! both sites: three machines in two groups whose programs see what is up when they
//! run; a manual step and `plan resume`; a failing program that stops a test run,
//! then `cleanup-test`; an unplanned run that goes on past a machine that cannot fail
//! over; `resume` after kill -9 of the command (mid-action, and right after a
//! failover request); a dry run that changes nothing; a plan point that is
//! consistent across machines whose writes alternate; a planned run at the primary
//! that promotes every machine at the target, then `plan commit`.

mod common;

use common::serve::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `replog plan VERB SITE ARGS…`.
fn plan(verb: &str, site: &Path, args: &[&str]) -> Output {
    replog()
        .args(["plan", verb])
        .arg(site)
        .args(args)
        .output()
        .expect("run replog plan")
}

fn jobs(site: &Path) -> Vec<serde_json::Value> {
    let out = run_ok(replog().arg("jobs").arg(site).arg("--json"));
    let v: serde_json::Value = serde_json::from_str(&out).expect("jobs json");
    v["jobs"].as_array().cloned().unwrap_or_default()
}

fn job(site: &Path, id: &str) -> serde_json::Value {
    let out = run_ok(replog().arg("jobs").arg(site).arg(id).arg("--json"));
    let v: serde_json::Value = serde_json::from_str(&out).expect("job json");
    v["jobs"][0].clone()
}

/// A program for plan actions: `body` after `#!/bin/sh`, executable.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    p
}

/// A source site with machines (each one disk `os` of 4 MiB) protected toward a
/// target; both serve with a mount; initial replication done.
struct Sites {
    tmp: tempfile::TempDir,
    src: PathBuf,
    dst: PathBuf,
    /// Where the target listens.
    addr: String,
    src_serve: Option<Served>,
    dst_serve: Option<Served>,
}

impl Sites {
    fn new(machines: &[&str]) -> Sites {
        let tmp = tempfile::tempdir().expect("tmp");
        let (src, dst) = trusted_sites(tmp.path());
        for m in machines {
            run_ok(
                replog()
                    .args(["disk", "create"])
                    .arg(&src)
                    .arg(format!("{m}/os"))
                    .args(["--size", "4M"]),
            );
        }
        let addr = format!("127.0.0.1:{}", free_port());
        let dst_serve = Served::start(&dst, &tmp.path().join("dst-mnt"), &["--listen", &addr]);
        let src_serve = Served::start(&src, &tmp.path().join("src-mnt"), &[]);
        for m in machines {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let o = replog()
                    .arg("protect")
                    .arg(&src)
                    .arg(m)
                    .args(["--target", &addr])
                    .output()
                    .expect("protect");
                if o.status.success() {
                    break;
                }
                assert!(Instant::now() < deadline, "protect {m}: {}", text(&o));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let s = Sites {
            tmp,
            src,
            dst,
            addr,
            src_serve: Some(src_serve),
            dst_serve: Some(dst_serve),
        };
        s.wait_shipped();
        s
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    fn src_mnt(&self) -> PathBuf {
        self.src_serve.as_ref().expect("src serve").mount.clone()
    }

    fn dst_mnt(&self) -> PathBuf {
        self.dst_serve.as_ref().expect("dst serve").mount.clone()
    }

    /// Wait until every protected machine's target acknowledged all written so far.
    fn wait_shipped(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let since = replog::format::now_ns();
        loop {
            let st = status(&self.src);
            let fresh = st["as_of_ns"].as_u64().unwrap_or(0) > since;
            let machines = st["machines"].as_array().cloned().unwrap_or_default();
            let all = !machines.is_empty()
                && machines.iter().all(|m| {
                    m["state"] == "protected"
                        && m["acked_lsn"].as_u64().is_some()
                        && m["acked_lsn"].as_u64() >= m["last_lsn"].as_u64()
                });
            if fresh && all {
                return;
            }
            assert!(Instant::now() < deadline, "never shipped: {st}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Store plan `body` (TOML) at `site`.
    fn add_plan(&self, site: &Path, body: &str) {
        let f = self.dir().join("plan.toml");
        std::fs::write(&f, body).expect("write plan");
        run_ok(
            replog()
                .args(["plan", "add", "--replace"])
                .arg(site)
                .arg(&f),
        );
    }
}

impl Drop for Sites {
    fn drop(&mut self) {
        if let Some(s) = self.src_serve.take() {
            s.stop();
        }
        if let Some(s) = self.dst_serve.take() {
            s.stop();
        }
        // The dead mounts of serves a test killed.
        replog::frontend::detach_replog_mounts_under(self.tmp.path());
    }
}

/// Plan `erp` of two groups; `action` ("before" or "after", a program) runs with
/// the second.
fn erp(first: &[&str], second: &[&str], action: Option<(&str, &Path)>) -> String {
    let list = |ms: &[&str]| {
        ms.iter()
            .map(|m| format!("\"{m}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut t = format!(
        "name = \"erp\"\n[[group]]\nmachines = [{}]\n[[group]]\nmachines = [{}]\n",
        list(first),
        list(second)
    );
    if let Some((phase, program)) = action {
        t.push_str(&format!(
            "  [[group.{phase}]]\n  run = \"{}\"\n",
            program.display()
        ));
    }
    t
}

/// The names under `mount` ending in `-test`, sorted, space-separated (what a script
/// sees as up in a test failover).
const LIST_COPIES: &str = r#"ls "$REPLOG_MOUNT" | grep -- '-test$' | tr '\n' ' '"#;

/// The plan job of `plan` at `site`, newest.
fn plan_job(site: &Path, plan: &str) -> serde_json::Value {
    jobs(site)
        .into_iter()
        .find(|j| j["kind"] == "plan" && j["plan"] == plan)
        .unwrap_or_else(|| panic!("no plan job of {plan}"))
}

/// How many jobs of `kind` for `machine` there are at `site`.
fn count_jobs(site: &Path, kind: &str, machine: &str) -> usize {
    jobs(site)
        .iter()
        .filter(|j| j["kind"] == kind && j["machine"] == machine)
        .count()
}

#[test]
fn three_machines_in_two_groups_come_up_in_order_as_their_programs_see_it() {
    if !fuse_available("three_machines_in_two_groups") {
        return;
    }
    let s = Sites::new(&["db", "app", "web"]);
    let data = common::pattern(7, MIB as usize);
    write_at(&s.src_mnt().join("db/os.img"), MIB, &data);
    s.wait_shipped();
    let log = s.dir().join("order.log");
    let rec = script(
        s.dir(),
        "record.sh",
        &format!(
            "echo \"$1 group=$REPLOG_GROUP kind=$REPLOG_FAILOVER machines=$REPLOG_MACHINES \
             plan=$REPLOG_PLAN up=$({LIST_COPIES})\" >> {log}\necho recorded $1",
            log = log.display()
        ),
    );
    // Before group 2, the job as `replog jobs` shows it while the run goes on.
    let seen = s.dir().join("jobs-during-run.json");
    let snap = script(
        s.dir(),
        "jobs.sh",
        &format!(
            "{} jobs \"$REPLOG_SITE\" --json > {}",
            env!("CARGO_BIN_EXE_replog"),
            seen.display()
        ),
    );
    s.add_plan(
        &s.dst,
        &format!(
            r#"name = "erp"
[[group]]
machines = ["db"]
  [[group.after]]
  run = "{rec} after-1"
  timeout = "30s"
[[group]]
machines = ["app", "web"]
  [[group.before]]
  run = "{rec} before-2"
  [[group.before]]
  run = "{snap}"
  [[group.after]]
  run = "{rec} after-2"
  [[group.after]]
  run = "{rec} planned-only"
  on = ["planned"]
"#,
            rec = rec.display(),
            snap = snap.display()
        ),
    );
    let o = plan("failover", &s.dst, &["erp", "--test"]);
    assert!(o.status.success(), "plan failover: {}", text(&o));

    let lines: Vec<String> = std::fs::read_to_string(&log)
        .expect("order log")
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    assert_eq!(
        lines,
        vec![
            "after-1 group=1 kind=test machines=db plan=erp up=db-test",
            "before-2 group=2 kind=test machines=app web plan=erp up=db-test",
            "after-2 group=2 kind=test machines=app web plan=erp up=app-test db-test web-test",
        ],
        "the programs saw another order"
    );

    // The copies hold the source's data, and are writable.
    let copy = s.dst_mnt().join("db-test/os.img");
    assert!(read_all(&copy)[MIB as usize..2 * MIB as usize] == data[..]);
    write_at(&copy, 0, b"test write");

    // While it ran, the job was there, in progress, group 1's failover linked to its
    // own job.
    let during: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&seen).expect("jobs seen")).expect("json");
    let running = during["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .find(|j| j["kind"] == "plan")
        .expect("the plan job, seen during the run")
        .clone();
    assert_eq!(running["state"], "in-progress", "{running}");
    assert_eq!(running["plan"], "erp");
    let step = running["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .find(|st| st["name"] == "group 1: fail over db (test)")
        .expect("db's failover step")
        .clone();
    assert_eq!(step["state"], "succeeded");
    let linked = step["detail"]
        .as_str()
        .and_then(|d| d.split_whitespace().nth(1))
        .map(|id| id.trim_end_matches(':').to_string())
        .expect("a linked job");
    let linked = job(&s.dst, &linked);
    assert_eq!(linked["kind"], "failover-test");
    assert_eq!(linked["machine"], "db");
    assert_eq!(linked["plan"], "erp");
    assert_eq!(linked["state"], "succeeded");
    // At the end: succeeded, every action's output kept, the planned-only one not run.
    let done = plan_job(&s.dst, "erp");
    assert_eq!(done["state"], "succeeded", "{done}");
    let steps = done["steps"].to_string();
    assert!(steps.contains("recorded after-2"), "{steps}");
    assert!(!steps.contains("planned-only"), "{steps}");

    // Cleanup removes every copy the run made; the replicas stay.
    let o = plan("cleanup-test", &s.dst, &["erp"]);
    assert!(o.status.success(), "cleanup-test: {}", text(&o));
    for m in ["db", "app", "web"] {
        assert!(!s.dst_mnt().join(format!("{m}-test")).exists());
        assert!(!s.dst.join(format!("machines/{m}-test")).exists());
        assert!(
            s.dst_mnt().join(m).join("points").exists(),
            "replica {m} gone"
        );
    }
    let o = plan("cleanup-test", &s.dst, &["erp"]);
    assert_eq!(o.status.code(), Some(1), "a second cleanup: {}", text(&o));
}

#[test]
fn a_manual_step_pauses_the_plan_until_resume() {
    if !fuse_available("a_manual_step_pauses_the_plan") {
        return;
    }
    let s = Sites::new(&["db", "app", "web"]);
    s.add_plan(
        &s.dst,
        r#"name = "erp"
[[group]]
machines = ["db"]
  [[group.after]]
  manual = "Check the database, then resume"
[[group]]
machines = ["app", "web"]
"#,
    );
    let o = plan("failover", &s.dst, &["erp", "--test", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(doc["state"], "waiting");
    assert_eq!(doc["manual"], "Check the database, then resume");
    assert!(doc["resume"]
        .as_str()
        .is_some_and(|r| r.contains("replog plan resume") && r.ends_with(" erp")));
    let j = plan_job(&s.dst, "erp");
    assert_eq!(j["state"], "waiting");
    assert!(s.dst_mnt().join("db-test/os.img").exists());
    assert!(!s.dst_mnt().join("app-test").exists(), "group 2 started");
    // The text form says how to resume, too.
    let o = plan("failover", &s.dst, &["erp", "--test"]);
    assert_eq!(o.status.code(), Some(1), "a second run while one waits");
    assert!(
        text(&o).contains("waiting at a manual action"),
        "{}",
        text(&o)
    );
    let o = plan("remove", &s.dst, &["erp"]);
    assert_eq!(o.status.code(), Some(1), "removed while a run waits");

    let o = plan("resume", &s.dst, &["erp"]);
    assert!(o.status.success(), "resume: {}", text(&o));
    for m in ["app", "web"] {
        assert!(s.dst_mnt().join(format!("{m}-test/os.img")).exists());
    }
    let j = plan_job(&s.dst, "erp");
    assert_eq!(j["state"], "succeeded");
    assert!(j["steps"].to_string().contains("resumed by process"));
    // db was not failed over twice.
    assert_eq!(count_jobs(&s.dst, "failover-test", "db"), 1);
    let o = plan("resume", &s.dst, &["erp"]);
    assert_eq!(o.status.code(), Some(1), "nothing left to resume");
}

#[test]
fn a_failing_program_stops_a_test_run_and_cleanup_removes_what_it_made() {
    if !fuse_available("a_failing_program_stops_a_test_run") {
        return;
    }
    let s = Sites::new(&["db", "app", "web"]);
    let fail = script(
        s.dir(),
        "fail.sh",
        "echo cannot reach the database >&2\nexit 3",
    );
    s.add_plan(
        &s.dst,
        &erp(&["db"], &["app", "web"], Some(("before", &fail))),
    );
    let o = plan("failover", &s.dst, &["erp", "--test"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("group 2: before 1") && err.contains("exit code 3"),
        "the error does not name the action and its code: {err}"
    );
    let j = plan_job(&s.dst, "erp");
    assert_eq!(j["state"], "failed");
    assert!(j["error"]
        .as_str()
        .is_some_and(|e| e.contains("exit code 3")));
    assert!(j["steps"].to_string().contains("cannot reach the database"));
    assert!(s.dst_mnt().join("db-test/os.img").exists());
    assert!(!s.dst_mnt().join("app-test").exists(), "the run went on");

    let o = plan("cleanup-test", &s.dst, &["erp"]);
    assert!(o.status.success(), "cleanup: {}", text(&o));
    assert!(!s.dst_mnt().join("db-test").exists());
    assert!(!s.dst.join("machines/db-test").exists());
    assert_eq!(plan_job(&s.dst, "erp")["state"], "succeeded"); // the cleanup's job
    let o = plan("resume", &s.dst, &["erp"]);
    assert_eq!(o.status.code(), Some(1), "a cleaned-up run resumed");
}

#[test]
fn an_unplanned_run_goes_on_past_a_machine_that_cannot_fail_over() {
    if !fuse_available("an_unplanned_run_goes_on") {
        return;
    }
    let s = Sites::new(&["db", "app", "web"]);
    // web was failed over on its own already: the plan cannot fail it over again.
    let o = replog()
        .arg("failover")
        .arg(&s.dst)
        .arg("web")
        .output()
        .expect("failover web");
    assert!(o.status.success(), "{}", text(&o));
    let after = s.dir().join("after-2.log");
    let rec = script(
        s.dir(),
        "after.sh",
        &format!("ls \"$REPLOG_MOUNT\" > {}", after.display()),
    );
    s.add_plan(
        &s.dst,
        &erp(&["web"], &["db", "app"], Some(("after", &rec))),
    );
    let o = plan("failover", &s.dst, &["erp", "--unplanned"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("web: ") && err.contains("already failed over"),
        "{err}"
    );
    assert!(!err.contains("db: ") && !err.contains("app: "), "{err}");
    // It went on: group 2 came up and its action ran.
    for m in ["db", "app"] {
        let img = s.dst_mnt().join(format!("{m}/os.img"));
        write_at(&img, 0, b"writable");
    }
    let seen = std::fs::read_to_string(&after).expect("group 2's action ran");
    assert!(seen.contains("db") && seen.contains("app"), "{seen}");
    let j = plan_job(&s.dst, "erp");
    assert_eq!(j["state"], "failed");
    assert!(
        j["error"].as_str().is_some_and(|e| e.contains("web")),
        "{j}"
    );
    let o = plan("resume", &s.dst, &["erp"]);
    assert_eq!(o.status.code(), Some(1), "an ended unplanned run resumed");
}

/// A plan program that blocks (touching `started`) until `go` exists, and then passes
/// at once: (the program, started, go). Each time it runs it adds its pid to `dir/runs`.
fn blocking_program(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (started, go) = (dir.join("started"), dir.join("go"));
    let block = script(
        dir,
        "block.sh",
        &format!(
            "echo $$ >> {runs}\n[ -e {go} ] && exit 0\ntouch {started}\nexec sleep 60",
            runs = dir.join("runs").display(),
            go = go.display(),
            started = started.display()
        ),
    );
    (block, started, go)
}

/// `replog plan failover SITE erp KIND`, left running once `started` exists.
fn failover_until(site: &Path, kind: &str, started: &Path) -> std::process::Child {
    let cli = replog()
        .args(["plan", "failover"])
        .arg(site)
        .args(["erp", kind])
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !started.exists() {
        assert!(Instant::now() < deadline, "the action never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    cli
}

/// `replog plan failover SITE erp --test`, killed by failpoint `point`.
fn test_run_killed_at(site: &Path, point: &str) {
    let o = replog()
        .args(["plan", "failover"])
        .arg(site)
        .args(["erp", "--test"])
        .env("REPLOG_FAILPOINT", point)
        .output()
        .expect("run");
    assert_eq!(
        o.status.code(),
        None,
        "the failpoint {point} did not kill it: {}",
        text(&o)
    );
}

/// The plan job's run state file (what `resume` goes on from).
fn run_state(site: &Path, job: &str) -> serde_json::Value {
    let p = site.join("plans/runs").join(format!("{job}.json"));
    serde_json::from_str(&std::fs::read_to_string(p).expect("run state")).expect("json")
}

#[test]
fn resume_goes_on_after_kill_9_of_the_command() {
    if !fuse_available("resume_goes_on_after_kill_9") {
        return;
    }
    let s = Sites::new(&["db", "app", "web"]);
    let (block, started, go) = blocking_program(s.dir());
    s.add_plan(
        &s.dst,
        &erp(&["db"], &["app", "web"], Some(("before", &block))),
    );
    // 1. Killed while an action runs.
    let mut cli = failover_until(&s.dst, "--test", &started);
    cli.kill().expect("kill -9");
    cli.wait().expect("wait");
    let j = plan_job(&s.dst, "erp");
    assert_eq!(j["state"], "in-progress");
    assert_eq!(j["owner_gone"], true);
    let left = run_state(&s.dst, j["id"].as_str().expect("id"))["action"]["pid"]
        .as_u64()
        .expect("the action's process") as i32;
    // SAFETY: signal 0 only asks whether the process is there.
    assert_eq!(
        unsafe { libc::kill(left, 0) },
        0,
        "the action died with the CLI"
    );
    std::fs::write(&go, "").expect("go");
    let o = plan("resume", &s.dst, &["erp"]);
    assert!(o.status.success(), "resume: {}", text(&o));
    let gone = gone_soon(left);
    assert!(gone, "the action the dead runner left was not stopped");
    for m in ["db", "app", "web"] {
        assert!(s.dst_mnt().join(format!("{m}-test/os.img")).exists());
    }
    assert_eq!(plan_job(&s.dst, "erp")["state"], "succeeded");
    assert_eq!(
        count_jobs(&s.dst, "failover-test", "db"),
        1,
        "db failed over twice"
    );
    let o = plan("cleanup-test", &s.dst, &["erp"]);
    assert!(o.status.success(), "cleanup: {}", text(&o));

    // 2. Killed right after a failover request came back (serve did it): resume
    //    adopts that failover through its job instead of asking again.
    test_run_killed_at(&s.dst, "plan:after-request");
    assert!(s.dst_mnt().join("db-test/os.img").exists());
    let o = plan("resume", &s.dst, &["erp"]);
    assert!(o.status.success(), "resume: {}", text(&o));
    assert_eq!(plan_job(&s.dst, "erp")["state"], "succeeded");
    assert_eq!(
        count_jobs(&s.dst, "failover-test", "db"),
        2,
        "db failed over again on resume instead of being adopted"
    );
    for m in ["app", "web"] {
        assert!(s.dst_mnt().join(format!("{m}-test/os.img")).exists());
    }

    // 3. Killed once the action's process group was recorded, its program not run
    //    yet (it waits behind its gate): the program never runs then — the gate
    //    ends with its runner — and resume runs it once.
    let o = plan("cleanup-test", &s.dst, &["erp"]);
    assert!(o.status.success(), "cleanup: {}", text(&o));
    let runs = || {
        std::fs::read_to_string(s.dir().join("runs"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let before = runs();
    assert!(before > 0, "the program never ran in parts 1 and 2");
    test_run_killed_at(&s.dst, "plan:action-started");
    let j = plan_job(&s.dst, "erp");
    let gate = run_state(&s.dst, j["id"].as_str().expect("id"))["action"]["pid"]
        .as_u64()
        .expect("the action's process group, recorded before it ran") as i32;
    assert!(gone_soon(gate), "the gate outlived the runner that held it");
    assert_eq!(runs(), before, "the program ran behind a gate never opened");
    let o = plan("resume", &s.dst, &["erp"]);
    assert!(o.status.success(), "resume: {}", text(&o));
    assert_eq!(runs(), before + 1, "resume did not run the program once");
    assert_eq!(plan_job(&s.dst, "erp")["state"], "succeeded");
}

/// Every file under `dir` with its size and content digest (sorted).
fn snapshot(dir: &Path, out: &mut Vec<(String, u64, u32)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let p = e.path();
        if p.is_dir() {
            out.push((p.display().to_string(), 0, 0));
            snapshot(&p, out);
        } else if let Ok(b) = std::fs::read(&p) {
            out.push((p.display().to_string(), b.len() as u64, crc32c::crc32c(&b)));
        }
    }
    out.sort();
}

/// What a plan run would change at a target: its machines, jobs, plans and runs,
/// the replicas' promotion records, the mount's listing.
fn what_a_run_changes(site: &Path, mount: &Path) -> Vec<(String, u64, u32)> {
    let mut out = Vec::new();
    for d in ["machines", "jobs", "plans"] {
        snapshot(&site.join(d), &mut out);
    }
    for m in ["db", "app", "web"] {
        let p = site.join("replicas").join(m).join("promoted.meta");
        out.push((p.display().to_string(), u64::from(p.exists()), 0));
    }
    let mut names: Vec<String> = std::fs::read_dir(mount)
        .expect("mount")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    out.push((names.join(","), 0, 0));
    out
}

#[test]
fn a_dry_run_checks_everything_and_changes_nothing() {
    if !fuse_available("a_dry_run_changes_nothing") {
        return;
    }
    let s = Sites::new(&["db", "app", "web"]);
    let marker = s.dir().join("ran");
    let prog = script(s.dir(), "act.sh", &format!("touch {}", marker.display()));
    s.add_plan(
        &s.dst,
        &format!(
            r#"name = "erp"
[[group]]
machines = ["db"]
  [[group.after]]
  run = "{p}"
  timeout = "90s"
  [[group.after]]
  manual = "look"
[[group]]
machines = ["app", "web"]
  [[group.before]]
  run = "{p}"
  on = ["planned"]
"#,
            p = prog.display()
        ),
    );
    let before = what_a_run_changes(&s.dst, &s.dst_mnt());
    let o = plan("failover", &s.dst, &["erp", "--test", "--dry-run"]);
    assert!(o.status.success(), "dry run: {}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for want in [
        "group 1: fail over db (test): db-test at pt-",
        "group 1: after 1: run",
        "killed after 1m 30s",
        "group 1: after 2: manual: look",
        "group 2: fail over app (test)",
        "skip group 2: before 1",
        "estimate:",
        "every check passed",
    ] {
        assert!(
            out.contains(want),
            "the dry run does not say {want:?}:\n{out}"
        );
    }
    let o = plan(
        "failover",
        &s.dst,
        &["erp", "--unplanned", "--dry-run", "--json"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(doc["ok"], true);
    assert_eq!(doc["steps"].as_array().map(Vec::len), Some(5), "{doc}");
    assert!(doc["estimate_failovers_s"]
        .as_f64()
        .is_some_and(|e| e > 0.0));
    assert_eq!(doc["actions_up_to_s"].as_f64(), Some(90.0));
    // A planned run does not run here (these machines are replicas): it says so.
    let o = plan("failover", &s.dst, &["erp", "--planned", "--dry-run"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("not a primary here"), "{}", text(&o));
    // A program that is no longer executable, a point that is not there.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let o = plan("failover", &s.dst, &["erp", "--test", "--dry-run"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("is not executable"), "{}", text(&o));
    let o = plan(
        "failover",
        &s.dst,
        &["erp", "--test", "--dry-run", "--at", "plan-point"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("no plan point is kept by every machine"),
        "{}",
        text(&o)
    );

    assert!(!marker.exists(), "a dry run ran a program");
    assert_eq!(
        before,
        what_a_run_changes(&s.dst, &s.dst_mnt()),
        "a dry run changed the site"
    );
}

/// The highest i such that block i of `img` holds i (writes are 4 KiB blocks whose
/// every 8 bytes are i + 1); every block below it must hold its own.
fn last_in_order(img: &[u8], what: &str) -> Option<u64> {
    let mut last = None;
    for (i, block) in img.chunks(4096).enumerate() {
        let want = (i as u64 + 1).to_le_bytes();
        if block.chunks(8).all(|w| w == want) {
            assert_eq!(
                last,
                i.checked_sub(1).map(|x| x as u64),
                "{what}: a gap before block {i}"
            );
            last = Some(i as u64);
        } else {
            assert!(
                block.iter().all(|&b| b == 0),
                "{what}: block {i} holds neither its write nor zeros"
            );
        }
    }
    last
}

#[test]
fn a_plan_point_is_consistent_across_machines_whose_writes_alternate() {
    if !fuse_available("a_plan_point_is_consistent") {
        return;
    }
    let s = Sites::new(&["db", "app"]);
    s.add_plan(
        &s.src,
        "name = \"pair\"\n[[group]]\nmachines = [\"db\"]\n[[group]]\nmachines = [\"app\"]\n",
    );
    s.add_plan(
        &s.dst,
        "name = \"pair\"\n[[group]]\nmachines = [\"db\"]\n[[group]]\nmachines = [\"app\"]\n",
    );
    // Writes alternate: db block i, then app block i, each acknowledged (fsync)
    // before the next begins.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (db, app) = (
            s.src_mnt().join("db/os.img"),
            s.src_mnt().join("app/os.img"),
        );
        let stop = stop.clone();
        std::thread::spawn(move || {
            let open = |p: &Path| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .expect("open disk")
            };
            let (db, app) = (open(&db), open(&app));
            let mut i = 0u64;
            while i < 1000 && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let block: Vec<u8> = (i + 1).to_le_bytes().repeat(512);
                for f in [&db, &app] {
                    f.write_all_at(&block, i * 4096).expect("write");
                    f.sync_data().expect("fsync");
                }
                i += 1;
            }
            i
        })
    };
    let mut ids = Vec::new();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(150));
        let o = plan("checkpoint", &s.src, &["pair", "--json"]);
        assert!(o.status.success(), "checkpoint: {}", text(&o));
        let doc: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        assert!(doc["writes_held_us"].as_u64().is_some(), "{doc}");
        assert_eq!(doc["points"].as_array().map(Vec::len), Some(2));
        ids.push(doc["plan_point"].as_str().expect("id").to_string());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().expect("writer");
    assert!(written > 0);
    s.wait_shipped();
    let mut seen_writes = false;
    for id in &ids {
        let mut last = Vec::new();
        for m in ["db", "app"] {
            let out = s.dir().join(format!("restore-{m}-{id}"));
            run_ok(
                replog()
                    .arg("restore")
                    .arg(&s.dst)
                    .arg(m)
                    .args(["--at", id, "--out"])
                    .arg(&out)
                    .arg("--json"),
            );
            last.push(last_in_order(&read_all(&out.join("os.img")), m));
        }
        // -1: none of its writes.
        let (db, app) = (
            last[0].map_or(-1, |x| x as i64),
            last[1].map_or(-1, |x| x as i64),
        );
        // app's write i follows db's write i, which follows app's write i - 1: a cut
        // at one instant has db == app or db == app + 1.
        assert!(
            db == app || db == app + 1,
            "plan point {id}: db holds its writes up to {db}, app up to {app}"
        );
        seen_writes |= db >= 0;
    }
    assert!(seen_writes, "no plan point fell among the writes");
    // At the target, the newest plan point both keep is the one a run would take.
    let o = plan(
        "failover",
        &s.dst,
        &[
            "pair",
            "--test",
            "--at",
            "plan-point",
            "--dry-run",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn a_planned_plan_run_at_the_primary_promotes_every_machine_at_the_target() {
    if !fuse_available("a_planned_plan_run") {
        return;
    }
    let s = Sites::new(&["db", "app", "web"]);
    let mut data = Vec::new();
    for (k, m) in ["db", "app", "web"].iter().enumerate() {
        let d = common::pattern(100 + k as u64, MIB as usize);
        write_at(&s.src_mnt().join(format!("{m}/os.img")), 2 * MIB, &d);
        data.push(d);
    }
    // The last writes are not waited for: a planned failover ships them.
    let body = "name = \"erp\"\n[[group]]\nmachines = [\"db\"]\n[[group]]\nmachines = [\"app\", \"web\"]\n";
    s.add_plan(&s.src, body);
    s.add_plan(&s.dst, body);
    // A machine whose shipping is paused cannot fail over planned: the dry run says
    // so, naming it; resumed, the run goes through.
    run_ok(replog().arg("pause").arg(&s.src).arg("app"));
    let o = plan("failover", &s.src, &["erp", "--planned", "--dry-run"]);
    assert!(
        !o.status.success() && text(&o).contains("shipping of app is paused"),
        "{}",
        text(&o)
    );
    run_ok(replog().arg("resume").arg(&s.src).arg("app"));
    let o = plan("failover", &s.src, &["erp", "--planned"]);
    assert!(o.status.success(), "planned plan failover: {}", text(&o));
    for (k, m) in ["db", "app", "web"].iter().enumerate() {
        let img = s.dst_mnt().join(format!("{m}/os.img"));
        assert!(
            read_all(&img)[2 * MIB as usize..3 * MIB as usize] == data[k][..],
            "{m} at the target lacks the source's last writes"
        );
        let e = std::fs::OpenOptions::new()
            .write(true)
            .open(s.src_mnt().join(format!("{m}/os.img")))
            .and_then(|f| f.write_all_at(b"x", 0).and_then(|()| f.sync_all()));
        assert_eq!(
            e.expect_err("the old primary took a write").raw_os_error(),
            Some(libc::EROFS)
        );
    }
    let st = fresh_status(&s.dst);
    for m in ["db", "app", "web"] {
        let e = st["machines"]
            .as_array()
            .expect("machines")
            .iter()
            .find(|x| x["name"] == m && x["role"] == "primary")
            .unwrap_or_else(|| panic!("{m} is not a primary at the target: {st}"))
            .clone();
        assert_eq!(e["state"], "commit-pending", "{e}");
    }
    assert_eq!(plan_job(&s.src, "erp")["state"], "succeeded");
    let o = plan("commit", &s.dst, &["erp"]);
    assert!(o.status.success(), "plan commit: {}", text(&o));
    let st = fresh_status(&s.dst);
    for m in ["db", "app", "web"] {
        assert!(st["machines"]
            .as_array()
            .expect("machines")
            .iter()
            .any(|x| x["name"] == m && x["role"] == "primary" && x["state"] == "unprotected"));
    }
}

#[test]
fn an_interrupted_run_is_given_up_only_by_abandon_and_a_new_run_is_refused_until_then() {
    if !fuse_available("an_interrupted_run_is_given_up") {
        return;
    }
    let s = Sites::new(&["db", "app"]);
    let (block, started, go) = blocking_program(s.dir());
    s.add_plan(&s.dst, &erp(&["db"], &["app"], Some(("before", &block))));
    let mut cli = failover_until(&s.dst, "--unplanned", &started);
    cli.kill().expect("kill -9");
    cli.wait().expect("wait");
    let run_job = plan_job(&s.dst, "erp")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let left = run_state(&s.dst, &run_job)["action"]["pid"]
        .as_u64()
        .expect("the action's process") as i32;
    // A new run is refused while this one is unfinished; the message says what to do.
    let o = plan("failover", &s.dst, &["erp", "--unplanned"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("replog plan abandon"), "{}", text(&o));
    let o = plan("abandon", &s.dst, &["erp"]);
    assert!(o.status.success(), "abandon: {}", text(&o));
    let j = job(&s.dst, &run_job);
    assert_eq!(j["state"], "cancelled", "{j}");
    assert!(j["steps"].to_string().contains("db (as db)"), "{j}");
    let dead = gone_soon(left);
    assert!(dead, "abandon left the run's program running");
    // db stays failed over; a new run goes on (db cannot fail over again: reported).
    assert!(s.dst_mnt().join("db/os.img").exists());
    std::fs::write(&go, "").expect("go");
    let o = plan("failover", &s.dst, &["erp", "--unplanned"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("db: "), "{}", text(&o));
    assert!(
        s.dst_mnt().join("app/os.img").exists(),
        "app did not come up"
    );
    let o = plan("abandon", &s.dst, &["erp"]);
    assert_eq!(o.status.code(), Some(1), "nothing left to abandon");
}

#[test]
fn resume_takes_over_a_failover_serve_made_before_it_died() {
    if !fuse_available("resume_takes_over_a_failover") {
        return;
    }
    let mut s = Sites::new(&["db", "app"]);
    s.add_plan(&s.dst, &erp(&["db"], &["app"], None));
    // The target's serve dies right after it promoted and opened db's test copy,
    // before the copy's check.
    let mount = s.dst_mnt();
    s.dst_serve.take().expect("dst serve").stop();
    let dying = Served::start_with_env(
        &s.dst,
        &mount,
        &["--listen", &s.addr],
        &[("REPLOG_FAILPOINT", "failover:before-verify")],
    );
    let o = plan("failover", &s.dst, &["erp", "--test"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    dying.wait_exit(Duration::from_secs(30));
    s.dst_serve = Some(Served::start(&s.dst, &mount, &["--listen", &s.addr]));
    assert_eq!(plan_job(&s.dst, "erp")["state"], "failed");
    // The copy was made; its job was failed as interrupted by the new serve.
    assert!(s.dst.join("machines/db-test/machine.meta").exists());
    let o = plan("resume", &s.dst, &["erp"]);
    assert!(o.status.success(), "resume: {}", text(&o));
    let j = plan_job(&s.dst, "erp");
    assert_eq!(j["state"], "succeeded", "{j}");
    assert!(j["steps"].to_string().contains("checked now"), "{j}");
    let db_jobs: Vec<serde_json::Value> = jobs(&s.dst)
        .into_iter()
        .filter(|j| j["kind"] == "failover-test" && j["machine"] == "db")
        .collect();
    assert_eq!(db_jobs.len(), 2, "{db_jobs:?}");
    assert_eq!(db_jobs[0]["state"], "succeeded");
    assert_eq!(db_jobs[1]["state"], "failed");
    for m in ["db", "app"] {
        assert!(s.dst_mnt().join(format!("{m}-test/os.img")).exists());
    }
    let o = plan("cleanup-test", &s.dst, &["erp"]);
    assert!(o.status.success(), "cleanup: {}", text(&o));
    assert!(!s.dst.join("machines/db-test").exists());
}

#[test]
fn a_plan_point_with_frozen_file_systems_is_app_consistent_and_thaws_them() {
    if !fuse_available("a_plan_point_with_frozen_file_systems") {
        return;
    }
    let s = Sites::new(&["db", "app"]);
    let body = "name = \"pair\"\n[[group]]\nmachines = [\"db\", \"app\"]\n";
    s.add_plan(&s.src, body);
    s.add_plan(&s.dst, body);
    // ext4 on both machines' disks, through loop devices on the source's mount.
    let mut held = Vec::new();
    let mut mounts = Vec::new();
    for m in ["db", "app"] {
        let lo = Loop::attach(&s.src_mnt().join(format!("{m}/os.img")));
        let mk = sh("mkfs.ext4", &["-q", "-F", &lo.0]);
        assert!(
            mk.status.success(),
            "mkfs: {}",
            String::from_utf8_lossy(&mk.stderr)
        );
        let dir = s.dir().join(format!("fs-{m}"));
        let fs = FsMount::mount(&lo.0, &dir, "rw");
        std::fs::write(dir.join("before.txt"), m).expect("write");
        mounts.push(dir);
        held.push((fs, lo));
    }
    let o = replog()
        .args(["plan", "checkpoint"])
        .arg(&s.src)
        .args(["pair", "--app-consistent", "--json"])
        .arg("--freeze")
        .arg(&mounts[0])
        .arg("--freeze")
        .arg(&mounts[1])
        .output()
        .expect("plan checkpoint");
    assert!(o.status.success(), "{}", text(&o));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(doc["app_consistent"], true);
    assert!(doc["frozen_ms"].as_f64().is_some(), "{doc}");
    let id = doc["plan_point"].as_str().expect("id").to_string();
    // Thawed: both file systems take writes again.
    for dir in &mounts {
        std::fs::write(dir.join("after.txt"), "later").expect("write after the thaw");
    }
    drop(held);
    s.wait_shipped();
    // At the target: each machine's point of the plan point is app-consistent, and its
    // ext4 is clean with the file written before it.
    for m in ["db", "app"] {
        let out = s.dir().join(format!("restored-{m}"));
        run_ok(
            replog()
                .arg("restore")
                .arg(&s.dst)
                .arg(m)
                .args(["--at", &id, "--out"])
                .arg(&out)
                .arg("--json"),
        );
        let img = out.join("os.img");
        let fsck = sh("e2fsck", &["-fn", img.to_str().expect("path")]);
        assert!(
            fsck.status.success(),
            "{m}: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        let cat = sh(
            "debugfs",
            &["-R", "cat /before.txt", img.to_str().expect("path")],
        );
        assert_eq!(
            String::from_utf8_lossy(&cat.stdout),
            m,
            "{m}: the file written before the plan point: {}",
            String::from_utf8_lossy(&cat.stderr)
        );
        let pts = run_ok(replog().arg("points").arg(&s.dst).arg(m).arg("--json"));
        let pts: serde_json::Value = serde_json::from_str(&pts).expect("json");
        assert!(pts["points"]
            .as_array()
            .expect("points")
            .iter()
            .any(|p| p["plan_point"] == id.as_str() && p["kind"] == "app-consistent"));
    }
}

/// Whether process `pid` is gone (or a zombie) within 2 s.
fn gone_soon(pid: i32) -> bool {
    (0..100).any(|_| {
        let gone = replog::jobs::process_start(pid as u32).is_none();
        std::thread::sleep(Duration::from_millis(20));
        gone
    })
}
