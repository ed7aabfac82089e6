//! The agent's own attack surface: what it keeps of its privileges, who can
//! reach its pinned objects, and who can change the policy it enforces.

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
    process::Command,
};

use tests::{Agent, bulkhead_bin, privileged, probe, world::world};

const CAP_BPF: u64 = 1 << 39;

/// A field like `CapEff:\t0000008000000000` of /proc/PID/task/TID/status.
fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("{key} missing"))
        .trim()
        .to_string()
}

#[test]
fn capabilities_are_dropped_after_attach_and_reload_still_works() {
    if !privileged("capabilities_dropped") {
        return;
    }
    let w = world();
    let mut agent = Agent::start(&w.root, &w.policy("", ""));
    let dst = format!("{}:8080", w.link.v4(2));
    assert_eq!(
        probe(&w.contractor, Some(&w.link.a), &["connect", "tcp", &dst]),
        "EPERM"
    );

    // Every thread, not only the main one: capabilities are per thread.
    let tasks: Vec<_> = fs::read_dir(format!("/proc/{}/task", agent.pid()))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(tasks.len() > 1, "the agent runs several threads");
    for t in &tasks {
        let s = fs::read_to_string(t.join("status")).unwrap();
        for key in ["CapEff:", "CapPrm:", "CapBnd:"] {
            let v = u64::from_str_radix(&status_field(&s, key), 16).unwrap();
            assert_eq!(
                v,
                CAP_BPF,
                "{} {key} {v:#x}: only CAP_BPF may remain",
                t.display()
            );
        }
        assert_eq!(status_field(&s, "CapAmb:"), "0000000000000000");
        assert_eq!(status_field(&s, "NoNewPrivs:"), "1");
    }

    // With only CAP_BPF left, a reload still rewrites the policy maps.
    let bridge = "bridges:\n  - name: opened\n    from: contractor\n    to: prod\n    ports: [tcp/8080]\n    reason: test\n";
    agent.reload(&w.policy("", bridge));
    assert_eq!(
        probe(&w.contractor, Some(&w.link.a), &["connect", "tcp", &dst]),
        "ECONNREFUSED",
        "the bridge of the reloaded policy is enforced (nothing listens)"
    );
    let status = agent.cli(&["status", "--json"]);
    assert!(status.status.success());
    let v: tests::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(v["generation"].as_u64() >= Some(2), "{v}");
    assert_eq!(
        v["capabilities"],
        "capabilities after attach: CAP_BPF only (bounding set cleared, no_new_privs)"
    );
}

#[test]
fn pinned_objects_are_closed_to_unprivileged_users() {
    if !privileged("pinned_objects") {
        return;
    }
    let w = world();
    let agent = Agent::start(&w.root, &w.policy("", ""));
    let mut seen = 0;
    let mut todo = vec![agent.bpffs.clone()];
    while let Some(p) = todo.pop() {
        let m = fs::symlink_metadata(&p).unwrap();
        assert_eq!(m.uid(), 0, "{}", p.display());
        let want = if m.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(m.mode() & 0o7777, want, "{}", p.display());
        if m.is_dir() {
            todo.extend(fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else {
            seen += 1;
        }
    }
    assert!(seen >= 10, "maps and links are pinned ({seen})");

    // An unprivileged user cannot even look up a pinned map by path.
    let map = agent.pins().join("maps").join("BH_STATE");
    assert!(map.exists(), "{}", map.display());
    let out = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg("ls")
        .arg(agent.pins().join("maps"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `bulkhead run` that must refuse to start (exit 1); its stderr.
fn refused_start(policy: &Path, cgroup_root: &Path, bpffs: &Path) -> String {
    let out = Command::new(bulkhead_bin())
        .arg("run")
        .arg("--policy")
        .arg(policy)
        .arg("--cgroup-root")
        .arg(cgroup_root)
        .arg("--bpffs-dir")
        .arg(bpffs)
        .arg("--no-stdout-events")
        .arg("--no-audit-db")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_pin_directory_owned_by_another_user_is_refused() {
    if !privileged("pin_dir_owner") {
        return;
    }
    let w = world();
    let dir = std::path::PathBuf::from("/sys/fs/bpf").join(tests::unique("bulkhead-test-"));
    tests::sh("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf");
    fs::create_dir(&dir).unwrap();
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let _rm = Remove(dir.clone());
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    let policy = tempfile::NamedTempFile::new().unwrap();
    fs::write(policy.path(), w.policy("", "")).unwrap();
    let err = refused_start(policy.path(), &w.root.path, &dir);
    assert!(err.contains("owned by uid 65534, not root"), "{err}");
    assert_eq!(
        fs::read_dir(&dir).unwrap().count(),
        0,
        "nothing was pinned there"
    );
}

#[test]
fn a_policy_file_others_can_write_is_refused_at_start_and_at_reload() {
    if !privileged("untrusted_policy") {
        return;
    }
    let w = world();
    let policy = w.policy("", "");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    fs::write(&path, &policy).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
    let bpffs = std::path::PathBuf::from("/sys/fs/bpf").join(tests::unique("bulkhead-test-"));
    let err = refused_start(&path, &w.root.path, &bpffs);
    assert!(
        err.contains("is writable by group or others (mode 0666)")
            && err.contains("--allow-untrusted-policy"),
        "{err}"
    );
    assert!(!bpffs.exists(), "refused before anything was loaded");

    // A running agent keeps its policy when the file becomes writable.
    let agent = Agent::start(&w.root, &policy);
    let dst = format!("{}:8080", w.link.v4(2));
    let dump = agent.cli(&["dump"]);
    assert!(dump.status.success());
    let bridge = "bridges:\n  - name: sneaked\n    from: contractor\n    to: prod\n    ports: [tcp/8080]\n    reason: x\n";
    // Writable first, then changed: the agent also watches the file.
    fs::set_permissions(&agent.policy, fs::Permissions::from_mode(0o666)).unwrap();
    fs::write(&agent.policy, w.policy("", bridge)).unwrap();
    let out = agent.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("writable by group or others"), "{err}");
    assert_eq!(
        probe(&w.contractor, Some(&w.link.a), &["connect", "tcp", &dst]),
        "EPERM"
    );
    assert_eq!(agent.cli(&["dump"]).stdout, dump.stdout, "maps unchanged");

    // Told explicitly, the agent accepts such a file.
    drop(agent);
    let agent = Agent::start_with(
        &w.root,
        &w.policy("", bridge),
        &["--allow-untrusted-policy"],
    );
    fs::set_permissions(&agent.policy, fs::Permissions::from_mode(0o666)).unwrap();
    let out = agent.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The shipped unit. Built in: the test also runs in a VM that has the
/// test binary but not the source tree.
const UNIT: &str = include_str!("../../deploy/systemd/bulkhead.service");

/// The value of the unit's `key=` line.
fn unit_setting(key: &str) -> &'static str {
    UNIT.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("{key}= in the unit"))
}

/// Gives this process (and so the agents it starts) the unit's
/// `LimitMEMLOCK=`, as systemd would: before 5.11 the kernel charges BPF
/// maps to it, and the agent, without CAP_SYS_RESOURCE, cannot raise it.
/// Where this process cannot raise it either (no CAP_SYS_RESOURCE) the
/// kernel is one that no longer charges maps to it, or the agent's start
/// below fails and says so.
fn apply_unit_memlock() {
    let limit = unit_setting("LimitMEMLOCK");
    assert_eq!(limit, "infinity", "the test applies `infinity` only");
    let r = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &r) } != 0 {
        eprintln!(
            "LimitMEMLOCK=infinity not applied: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The capabilities the shipped unit grants (`CapabilityBoundingSet=`), as
/// `setpriv` names them: `bpf`, `perfmon`, ...
fn unit_capabilities() -> Vec<String> {
    unit_setting("CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect()
}

fn bounding_set(caps: &[String]) -> String {
    let mut arg = String::from("-all");
    for c in caps {
        arg += &format!(",+{c}");
    }
    arg
}

/// With exactly the unit's capabilities the agent starts, enforces, reloads
/// and ends with CAP_BPF alone; without any one of the three it cannot
/// load or attach without, it refuses to start and names that one.
#[test]
fn the_units_capabilities_suffice_and_each_required_one_is_named_when_missing() {
    if !privileged("unit_capabilities") {
        return;
    }
    let caps = unit_capabilities();
    assert_eq!(caps.len(), 6, "{caps:?}");
    apply_unit_memlock();
    let w = world();
    let set = bounding_set(&caps);
    let mut agent = Agent::start_under(
        &w.root,
        &w.policy("", ""),
        &["setpriv", "--bounding-set", &set],
    );
    let dst = format!("{}:8080", w.link.v4(2));
    assert_eq!(
        probe(&w.contractor, Some(&w.link.a), &["connect", "tcp", &dst]),
        "EPERM"
    );
    let bridge = "bridges:\n  - name: opened\n    from: contractor\n    to: prod\n    ports: [tcp/8080]\n    reason: test\n";
    agent.reload(&w.policy("", bridge));
    assert_eq!(
        probe(&w.contractor, Some(&w.link.a), &["connect", "tcp", &dst]),
        "ECONNREFUSED"
    );
    let status = agent.cli(&["status", "--json"]);
    let v: tests::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        v["capabilities"],
        "capabilities after attach: CAP_BPF only (bounding set cleared, no_new_privs)"
    );
    let s = fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    assert_eq!(
        u64::from_str_radix(&status_field(&s, "CapBnd:"), 16).unwrap(),
        CAP_BPF
    );
    drop(agent);

    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.yaml");
    fs::write(&policy, w.policy("", "")).unwrap();
    for required in ["bpf", "perfmon", "net_admin"] {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != required).cloned().collect();
        let bpffs = Path::new("/sys/fs/bpf").join(tests::unique("bulkhead-test-"));
        let out = Command::new("setpriv")
            .args(["--bounding-set", &bounding_set(&fewer)])
            .arg(bulkhead_bin())
            .arg("run")
            .arg("--policy")
            .arg(&policy)
            .arg("--cgroup-root")
            .arg(&w.root.path)
            .arg("--bpffs-dir")
            .arg(&bpffs)
            .args(["--no-stdout-events", "--no-audit-db"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "without {required}: {err}");
        let name = format!("CAP_{}", required.to_uppercase());
        assert!(
            err.contains("missing capabilities") && err.contains(&name),
            "without {required} the refusal must name {name}: {err}"
        );
        assert!(!bpffs.exists(), "nothing may be pinned without {required}");
    }
}
