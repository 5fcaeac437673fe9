//! The recovery plan file (TOML), as `replog plan add` takes it:
//!
//! ```toml
//! name = "erp"
//! [[group]]
//! machines = ["db"]
//!   [[group.after]]
//!   run = "/usr/local/bin/check-db --quick"   # split as a shell would, no expansion
//!   timeout = "120s"                          # default 10m; 1s to 24h
//!   on = ["test", "planned", "unplanned"]     # default: all
//!   [[group.after]]
//!   manual = "Check the database, then run: replog plan resume SITE erp"
//! [[group]]
//! machines = ["app", "web"]
//! ```
//!
//! Rules: a valid name; 1 to [`MAX_GROUPS`] groups, none empty; at most
//! [`MAX_MACHINES`] machines in all, each once, each known to this site as a primary or
//! a replica; an action is exactly one of `run` (the first word an absolute path, no
//! `..`, to an executable regular file) or `manual` (text; no `timeout`); `on` names
//! failover kinds, each once. Unknown keys are refused. Every error names the file's
//! line and the key; nothing is stored unless the whole plan is valid.

use crate::error::{Error, Result};
use crate::names::validate_name;
use crate::protection::FailoverKind;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Component, Path};
use std::time::Duration;
use toml::Spanned;

/// At most this many groups in a plan (as Azure Site Recovery).
pub const MAX_GROUPS: usize = 7;
/// At most this many machines in a plan.
pub const MAX_MACHINES: usize = 100;
/// At most this many actions before, and after, a group.
pub const MAX_ACTIONS: usize = 20;
/// A plan file is at most this long.
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// An action's timeout when the plan gives none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
const MIN_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
const MAX_MANUAL_CHARS: usize = 4000;

/// A valid plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    pub groups: Vec<Group>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub machines: Vec<String>,
    pub before: Vec<Action>,
    pub after: Vec<Action>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    pub what: ActionKind,
    /// The failover kinds it runs for.
    pub on: Vec<FailoverKind>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionKind {
    /// Run `argv` (argv[0] an absolute path), killed after `timeout_ms`.
    Run {
        argv: Vec<String>,
        timeout_ms: u64,
        /// The `run` line as written.
        line: String,
    },
    /// Pause the plan until `replog plan resume`; `text` says what to do.
    Manual { text: String },
}

impl Action {
    pub fn runs_on(&self, kind: FailoverKind) -> bool {
        self.on.contains(&kind)
    }

    /// How a person reads it in steps and listings.
    pub fn describe(&self) -> String {
        match &self.what {
            ActionKind::Run { line, .. } => format!("run {line}"),
            ActionKind::Manual { text } => format!("manual: {text}"),
        }
    }
}

impl Plan {
    pub fn machines(&self) -> impl Iterator<Item = &String> {
        self.groups.iter().flat_map(|g| g.machines.iter())
    }

    /// Action `index` (0-based) before or after group `group` (0-based).
    pub fn action(&self, group: usize, after: bool, index: usize) -> Option<&Action> {
        let g = self.groups.get(group)?;
        if after { &g.after } else { &g.before }.get(index)
    }
}

/// What this site is for a machine a plan names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    Primary,
    Replica,
    /// A test copy (neither a primary nor a replica: a plan cannot name it).
    TestCopy,
    Unknown,
}

/// What `parse` checks beyond the file's own rules.
pub struct Checks<'a> {
    /// What this site is for a machine (None: not checked, a stored plan read back).
    pub machines: Option<&'a dyn Fn(&str) -> Known>,
    /// Whether each `run` program must be an executable file now.
    pub executables: bool,
}

impl Checks<'_> {
    /// A stored plan read back: it was checked when it was added.
    pub const STORED: Checks<'static> = Checks {
        machines: None,
        executables: false,
    };
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    name: Option<Spanned<String>>,
    group: Option<Spanned<Vec<Spanned<RawGroup>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    machines: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    before: Vec<Spanned<RawAction>>,
    #[serde(default)]
    after: Vec<Spanned<RawAction>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAction {
    run: Option<Spanned<String>>,
    manual: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    on: Option<Spanned<Vec<Spanned<String>>>>,
}

/// Errors that name the file, the line and the key.
struct At<'a> {
    file: &'a str,
    text: &'a str,
}

impl At<'_> {
    fn line(&self, span: &Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text
            .get(..end)
            .map_or(1, |t| t.matches('\n').count() + 1)
    }

    fn err(&self, span: &Range<usize>, key: &str, what: impl std::fmt::Display) -> Error {
        Error::InvalidInput(format!(
            "{} line {}, {key}: {what}; nothing was stored",
            self.file,
            self.line(span)
        ))
    }
}

/// Parse and validate plan `text` (from `file`, named in errors).
pub fn parse(text: &str, file: &str, checks: &Checks<'_>) -> Result<Plan> {
    let at = At { file, text };
    if text.len() > MAX_FILE_BYTES {
        return Err(Error::InvalidInput(format!(
            "{file}: {} bytes; a plan file is at most {MAX_FILE_BYTES}",
            text.len()
        )));
    }
    let raw: RawPlan = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        at.err(&span, "TOML", e.message().trim())
    })?;
    let whole = 0..0;
    let name = raw
        .name
        .ok_or_else(|| at.err(&whole, "key `name`", "missing: the plan needs a name"))?;
    validate_name("plan", name.get_ref()).map_err(|e| at.err(&name.span(), "key `name`", e))?;
    let groups = raw.group.ok_or_else(|| {
        at.err(
            &whole,
            "[[group]]",
            "missing: a plan has 1 to 7 groups of machines",
        )
    })?;
    if groups.get_ref().is_empty() || groups.get_ref().len() > MAX_GROUPS {
        return Err(at.err(
            &groups.span(),
            "[[group]]",
            format!(
                "{} groups; a plan has 1 to {MAX_GROUPS}",
                groups.get_ref().len()
            ),
        ));
    }
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = Vec::new();
    for (gi, g) in groups.into_inner().into_iter().enumerate() {
        let gspan = g.span();
        let g = g.into_inner();
        let gname = format!("group {}", gi + 1);
        let machines = g.machines.ok_or_else(|| {
            at.err(
                &gspan,
                &format!("{gname}, key `machines`"),
                "missing: every group names its machines",
            )
        })?;
        let key = format!("{gname}, key `machines`");
        if machines.get_ref().is_empty() {
            return Err(at.err(&machines.span(), &key, "empty: a group has machines"));
        }
        let mut names = Vec::new();
        for m in machines.into_inner() {
            let span = m.span();
            let m = m.into_inner();
            validate_name("machine", &m).map_err(|e| at.err(&span, &key, e))?;
            if let Some(first) = seen.get(&m) {
                return Err(at.err(
                    &span,
                    &key,
                    format!("{m} is named twice (first in group {first}); a machine is in one group, once"),
                ));
            }
            seen.insert(m.clone(), gi + 1);
            if seen.len() > MAX_MACHINES {
                return Err(at.err(
                    &span,
                    &key,
                    format!("more than {MAX_MACHINES} machines in the plan"),
                ));
            }
            if let Some(known) = checks.machines {
                match known(&m) {
                    Known::Primary | Known::Replica => {}
                    Known::TestCopy => {
                        return Err(at.err(
                            &span,
                            &key,
                            format!(
                                "{m} is a test copy at this site, neither a primary nor a \
                                 replica"
                            ),
                        ))
                    }
                    Known::Unknown => {
                        return Err(at.err(
                            &span,
                            &key,
                            format!(
                                "this site has no machine and no replica named {m} (add the \
                                 plan at each site that runs it, once it knows the machines)"
                            ),
                        ))
                    }
                }
            }
            names.push(m);
        }
        let mut phases = Vec::new();
        for (phase, list) in [("before", g.before), ("after", g.after)] {
            if list.len() > MAX_ACTIONS {
                let span = list.first().map(|a| a.span()).unwrap_or(gspan.clone());
                return Err(at.err(
                    &span,
                    &format!("{gname}, [[group.{phase}]]"),
                    format!("{} actions; at most {MAX_ACTIONS}", list.len()),
                ));
            }
            let mut actions = Vec::new();
            for (ai, a) in list.into_iter().enumerate() {
                let where_ = format!("{gname}, {phase} action {}", ai + 1);
                actions.push(action(&at, &where_, a, checks)?);
            }
            phases.push(actions);
        }
        let after = phases.pop().unwrap_or_default();
        let before = phases.pop().unwrap_or_default();
        out.push(Group {
            machines: names,
            before,
            after,
        });
    }
    Ok(Plan {
        name: name.into_inner(),
        groups: out,
    })
}

fn action(at: &At<'_>, where_: &str, a: Spanned<RawAction>, checks: &Checks<'_>) -> Result<Action> {
    let span = a.span();
    let a = a.into_inner();
    let on = match a.on {
        None => vec![
            FailoverKind::Test,
            FailoverKind::Planned,
            FailoverKind::Unplanned,
        ],
        Some(on) => {
            let key = format!("{where_}, key `on`");
            if on.get_ref().is_empty() {
                return Err(at.err(
                    &on.span(),
                    &key,
                    "empty: name the failover kinds (test, planned, unplanned) or leave `on` out for all",
                ));
            }
            let mut kinds = Vec::new();
            for k in on.into_inner() {
                let kind = match k.get_ref().as_str() {
                    "test" => FailoverKind::Test,
                    "planned" => FailoverKind::Planned,
                    "unplanned" => FailoverKind::Unplanned,
                    other => {
                        return Err(at.err(
                            &k.span(),
                            &key,
                            format!("{other:?} is not a failover kind (test, planned, unplanned)"),
                        ))
                    }
                };
                if kinds.contains(&kind) {
                    return Err(at.err(&k.span(), &key, format!("{kind} is named twice")));
                }
                kinds.push(kind);
            }
            kinds
        }
    };
    let what = match (a.run, a.manual) {
        (Some(_), Some(m)) => {
            return Err(at.err(
                &m.span(),
                &format!("{where_}, key `manual`"),
                "an action is either `run` or `manual`, not both",
            ))
        }
        (None, None) => {
            return Err(at.err(
                &span,
                where_,
                "neither `run` nor `manual`: an action runs a program or asks an operator",
            ))
        }
        (None, Some(m)) => {
            let key = format!("{where_}, key `manual`");
            if let Some(t) = &a.timeout {
                return Err(at.err(
                    &t.span(),
                    &format!("{where_}, key `timeout`"),
                    "a manual action waits for `replog plan resume`: it has no timeout",
                ));
            }
            let text = m.get_ref().trim();
            if text.is_empty() {
                return Err(at.err(&m.span(), &key, "empty: say what the operator does"));
            }
            if text.chars().count() > MAX_MANUAL_CHARS {
                return Err(at.err(
                    &m.span(),
                    &key,
                    format!("longer than {MAX_MANUAL_CHARS} characters"),
                ));
            }
            if text
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t')
            {
                return Err(at.err(&m.span(), &key, "holds control characters"));
            }
            ActionKind::Manual {
                text: text.to_string(),
            }
        }
        (Some(r), None) => {
            let key = format!("{where_}, key `run`");
            let line = r.get_ref().trim().to_string();
            let argv = program(&line).map_err(|why| at.err(&r.span(), &key, why))?;
            if checks.executables {
                let p = argv.first().map(String::as_str).unwrap_or_default();
                executable(Path::new(p)).map_err(|why| at.err(&r.span(), &key, why))?;
            }
            let timeout = match &a.timeout {
                None => DEFAULT_TIMEOUT,
                Some(t) => {
                    let key = format!("{where_}, key `timeout`");
                    let d = humantime::parse_duration(t.get_ref().trim()).map_err(|e| {
                        at.err(
                            &t.span(),
                            &key,
                            format!("{:?}: {e} (e.g. \"120s\", \"10m\")", t.get_ref()),
                        )
                    })?;
                    if !(MIN_TIMEOUT..=MAX_TIMEOUT).contains(&d) {
                        return Err(at.err(
                            &t.span(),
                            &key,
                            format!("{:?}: a timeout is 1s to 24h", t.get_ref()),
                        ));
                    }
                    d
                }
            };
            ActionKind::Run {
                argv,
                timeout_ms: timeout.as_millis() as u64,
                line,
            }
        }
    };
    Ok(Action { what, on })
}

/// The words of a `run` line: split as a shell would (quotes, backslashes; no
/// expansion), the first an absolute path without `.` or `..` parts.
fn program(line: &str) -> std::result::Result<Vec<String>, String> {
    let argv = shlex::split(line)
        .ok_or_else(|| format!("{line:?}: an unterminated quote or a trailing backslash"))?;
    let Some(first) = argv.first() else {
        return Err("empty: name the program to run".into());
    };
    if line.chars().any(char::is_control) {
        return Err(format!("{line:?} holds control characters"));
    }
    let p = Path::new(first);
    if !p.is_absolute() {
        return Err(format!(
            "{first:?} is not an absolute path: the program is named by its full path \
             (no search of PATH)"
        ));
    }
    if p.components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(format!(
            "{first:?} holds `.` or `..`: name the program's own path"
        ));
    }
    Ok(argv)
}

/// Whether `p` is a regular file this process may execute (`access(X_OK)`: the
/// file's mode as it applies to this user, not merely any execute bit).
pub fn executable(p: &Path) -> std::result::Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let md = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
    if !md.is_file() {
        return Err(format!("{} is not a regular file", p.display()));
    }
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| format!("{} holds a NUL byte", p.display()))?;
    // SAFETY: access(2) of a NUL-terminated path.
    if unsafe { libc::access(c.as_ptr(), libc::X_OK) } != 0 {
        return Err(format!("{} is not executable", p.display()));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn known(m: &str) -> Known {
        match m {
            "db" | "app" => Known::Primary,
            "web" => Known::Replica,
            "db-test" => Known::TestCopy,
            m if m.starts_with('m') && m[1..].parse::<u32>().is_ok() => Known::Primary,
            _ => Known::Unknown,
        }
    }

    fn check(text: &str) -> Result<Plan> {
        parse(
            text,
            "plan.toml",
            &Checks {
                machines: Some(&known),
                executables: true,
            },
        )
    }

    const GOOD: &str = r#"name = "erp"
[[group]]
machines = ["db"]
  [[group.after]]
  run = "/bin/sh -c 'echo \"up\" > /dev/null'"
  timeout = "120s"
  on = ["test", "planned"]
  [[group.after]]
  manual = "Check the database"
[[group]]
machines = ["app", "web"]
  [[group.before]]
  run = "/bin/true"
"#;

    #[test]
    fn a_good_plan_parses_with_defaults() {
        let p = check(GOOD).unwrap();
        assert_eq!(p.name, "erp");
        assert_eq!(p.groups.len(), 2);
        assert_eq!(p.groups[1].machines, vec!["app", "web"]);
        let a = &p.groups[0].after[0];
        match &a.what {
            ActionKind::Run {
                argv, timeout_ms, ..
            } => {
                assert_eq!(argv, &["/bin/sh", "-c", "echo \"up\" > /dev/null"]);
                assert_eq!(*timeout_ms, 120_000);
            }
            other => panic!("{other:?}"),
        }
        assert!(a.runs_on(FailoverKind::Test) && !a.runs_on(FailoverKind::Unplanned));
        let b = &p.groups[1].before[0];
        assert!(b.runs_on(FailoverKind::Unplanned));
        match &b.what {
            ActionKind::Run { timeout_ms, .. } => {
                assert_eq!(*timeout_ms, DEFAULT_TIMEOUT.as_millis() as u64)
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            p.groups[0].after[1].what,
            ActionKind::Manual {
                text: "Check the database".into()
            }
        );
        // Read back without the site's checks: the same plan.
        assert_eq!(parse(GOOD, "x", &Checks::STORED).unwrap(), p);
    }

    /// Each bad plan is refused, naming the line and the key.
    #[test]
    fn every_bad_plan_is_refused_with_its_line_and_key() {
        let groups = |n: usize| {
            (0..n)
                .map(|i| format!("[[group]]\nmachines = [\"m{i}\"]\n"))
                .collect::<String>()
        };
        let tmp = tempfile::tempdir().unwrap();
        let plain = tmp.path().join("not-a-program");
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        let plain = plain.display().to_string();
        let many: String = {
            let names: Vec<String> = (0..101).map(|i| format!("\"m{i}\"")).collect();
            format!(
                "name = \"p\"\n[[group]]\nmachines = [{}]\n",
                names.join(", ")
            )
        };
        let cases: Vec<(String, &str, &str)> = vec![
            ("name = \"p\"\n[[group]]\nmachines = [\"db\"]\nflavour = 1\n".into(), "line 4", "unknown field `flavour`"),
            ("nom = \"p\"\n".into(), "line 1", "unknown field `nom`"),
            ("name = \"p\"\n".into(), "[[group]]", "missing"),
            ("name = \"../x\"\n[[group]]\nmachines = [\"db\"]\n".into(), "line 1, key `name`", "invalid plan name"),
            (format!("name = \"p\"\n{}", groups(8)), "[[group]]", "8 groups"),
            ("name = \"p\"\n[[group]]\nmachines = []\n".into(), "line 3, group 1, key `machines`", "empty"),
            ("name = \"p\"\n[[group]]\n[[group]]\nmachines = [\"db\"]\n".into(), "group 1, key `machines`", "missing"),
            ("name = \"p\"\n[[group]]\nmachines = [\"db\"]\n[[group]]\nmachines = [\"app\", \"db\"]\n".into(), "line 5, group 2, key `machines`", "db is named twice (first in group 1)"),
            ("name = \"p\"\n[[group]]\nmachines = [\"../etc\"]\n".into(), "line 3", "invalid machine name"),
            ("name = \"p\"\n[[group]]\nmachines = [\"nope\"]\n".into(), "line 3, group 1, key `machines`", "no machine and no replica named nope"),
            ("name = \"p\"\n[[group]]\nmachines = [\"db-test\"]\n".into(), "line 3", "test copy"),
            (many, "line 3", "more than 100 machines"),
            ("name = \"p\"\n[[group]]\nmachines = [\"db\"]\n[[group.before]]\nrun = \"bin/true\"\n".into(), "line 5, group 1, before action 1, key `run`", "not an absolute path"),
            ("name = \"p\"\n[[group]]\nmachines = [\"db\"]\n[[group.before]]\nrun = \"/bin/../bin/true\"\n".into(), "line 5", "`..`"),
            ("name = \"p\"\n[[group]]\nmachines = [\"db\"]\n[[group.before]]\nrun = \"/bin/true 'open\"\n".into(), "line 5", "unterminated quote"),
            ("name = \"p\"\n[[group]]\nmachines = [\"db\"]\n[[group.before]]\nrun = \"/no/such/program\"\n".into(), "line 5", "No such file"),
            (format!("name = \"p\"\n[[group]]\nmachines = [\"db\"]\n[[group.before]]\nrun = \"{plain}\"\n"), "line 5", "not executable"),
            ("name = \"p\"\n[[group]]\nmachines = [\"db\"]\n[[group.before]]\nrun = \"/bin\"\n".into(), "line 5", "not a regular file"),
            ("name = \"p\"\n[[group]]\nmachines = [\"db\"]\n[[group.before]]\nrun = \"\"\n".into(), "line 5", "empty"),
            ("name = \"p\"\n[[group]]\nmachines = [\"db\"]\n[[group.after]]\nrun = \"/bin/true\"\ntimeout = \"soon\"\n".into(), "line 6, group 1, after action 1, key `timeout`", "\"soon\""),
            ("name = \"p\"\n[[group]]\nmachines = [\"db\"]\n[[group.after]]\nrun = \"/bin/true\"\ntimeout = \"100h\"\n".into(), "line 6", "1s to 24h"),
            ("name = \"p\"\n[[group]]\nmachines = [\"db\"]\n[[group.after]]\nrun = \"/bin/true\"\non = [\"sometimes\"]\n".into(), "line 6, group 1, after action 1, key `on`", "not a failover kind"),
            ("name = \"p\"\n[[group]]\nmachines = [\"db\"]\n[[group.after]]\nrun = \"/bin/true\"\non = [\"test\", \"test\"]\n".into(), "line 6", "named twice"),
            ("name = \"p\"\n[[group]]\nmachines = [\"db\"]\n[[group.after]]\nrun = \"/bin/true\"\non = []\n".into(), "line 6", "empty"),
            ("name = \"p\"\n[[group]]\nmachines = [\"db\"]\n[[group.after]]\nrun = \"/bin/true\"\nmanual = \"x\"\n".into(), "line 6", "not both"),
            ("name = \"p\"\n[[group]]\nmachines = [\"db\"]\n[[group.after]]\ntimeout = \"1s\"\n".into(), "group 1, after action 1", "neither `run` nor `manual`"),
            ("name = \"p\"\n[[group]]\nmachines = [\"db\"]\n[[group.after]]\nmanual = \"wait\"\ntimeout = \"1s\"\n".into(), "line 6, group 1, after action 1, key `timeout`", "no timeout"),
            ("name = \"p\"\n[[group]]\nmachines = [\"db\"]\n[[group.after]]\nmanual = \"  \"\n".into(), "line 5", "empty"),
            ("name = \"p\"\n[[group]]\nmachines = [\"db\"]\n[[group.after]]\nmanual = \"a\\u0007b\"\n".into(), "line 5", "control characters"),
            ("name = \"p\"\n[[group]]\nmachines = [\"db\"]\n[[group.after]]\nrun = \"/bin/echo \\u001b[2J\"\n".into(), "line 5, group 1, after action 1, key `run`", "control characters"),
            ("name = \"p\"\n[[group]]\nmachines = [\"db\"]\n[[group.after]]\nrun = \"/bin/true\"\nscript = \"x\"\n".into(), "line 6", "unknown field `script`"),
            ("name = \"p\"\n[[group\nmachines = [\"db\"]\n".into(), "line 2", "TOML"),
            ("name = 5\n".into(), "line 1", "TOML"),
        ];
        for (text, where_, what) in cases {
            let e = check(&text).expect_err(&text).to_string();
            assert!(
                e.contains("plan.toml") && e.contains(where_) && e.contains(what),
                "for\n{text}\nthe error\n  {e}\nlacks {where_:?} or {what:?}"
            );
        }
    }
}
