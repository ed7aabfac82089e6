//! Where the kubelet puts a pod's cgroup, for both of its cgroup drivers.
//!
//! The kubelet names cgroups as lists of components: the pod of UID `U` in
//! QoS class Burstable is `[<cgroup root...>, kubepods, burstable, podU]`
//! (Guaranteed pods sit directly under `kubepods`). The driver turns the
//! list into a path:
//!
//! - `cgroupfs`: the components joined by `/`:
//!   `/kubepods/burstable/pod1b4e28ba-2fa1-11d2-883f-0016d3cca427`.
//! - `systemd`: nested slices, each named by all components so far joined
//!   by `-`, with `-` inside a component escaped as `_`:
//!   `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice`.
//!
//! Containers are cgroups below the pod's, named by the runtime:
//! `cri-containerd-<id>.scope` / `crio-<id>.scope` / `docker-<id>.scope`
//! with systemd, `<id>` (`crio-<id>` for CRI-O) with cgroupfs.
//!
//! A node runs one driver, and the kubelet's `--cgroup-root` may put
//! `kubepods` below another cgroup (kind nodes use `/kubelet`). [`detect`]
//! finds the layouts present under the cgroup v2 mount; [`locate`] finds a
//! pod's cgroup in them.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
};

use super::pod::{ContainerId, PodInfo, Qos};
use crate::kernel::cgroup;

/// The kubelet's `cgroupDriver`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Driver {
    Systemd,
    Cgroupfs,
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Driver::Systemd => "systemd",
            Driver::Cgroupfs => "cgroupfs",
        })
    }
}

/// One kubelet's cgroup layout: its driver and its `--cgroup-root`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Layout {
    pub driver: Driver,
    /// `--cgroup-root` as components: `[]` for the default `/`,
    /// `["kubelet"]` for `/kubelet`.
    pub root: Vec<String>,
}

impl Layout {
    /// A layout from the kubelet's settings: `cgroupDriver` and
    /// `cgroupRoot` in cgroupfs form (`/`, `/kubelet`).
    pub fn new(driver: Driver, cgroup_root: &str) -> Layout {
        Layout {
            driver,
            root: cgroup_root
                .split('/')
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect(),
        }
    }

    fn kubepods(&self) -> Vec<String> {
        let mut c = self.root.clone();
        c.push("kubepods".into());
        c
    }

    fn pod_components(&self, qos: Qos, uid: &str) -> Vec<String> {
        let mut c = self.kubepods();
        c.extend(qos.cgroup_component().map(str::to_owned));
        c.push(format!("pod{uid}"));
        c
    }

    /// The `kubepods` cgroup, relative to the cgroup v2 mount.
    pub fn kubepods_path(&self) -> String {
        self.path(&self.kubepods())
    }

    /// A pod's cgroup, relative to the cgroup v2 mount.
    pub fn pod_path(&self, qos: Qos, uid: &str) -> String {
        self.path(&self.pod_components(qos, uid))
    }

    /// A container's cgroup, relative to the cgroup v2 mount.
    pub fn container_path(&self, qos: Qos, uid: &str, c: &ContainerId) -> String {
        let pod = self.pod_path(qos, uid);
        let prefix = match (self.driver, c.runtime.as_str()) {
            (Driver::Systemd, "containerd") => "cri-containerd-",
            (Driver::Systemd, "cri-o") | (Driver::Cgroupfs, "cri-o") => "crio-",
            (Driver::Systemd, "docker") => "docker-",
            (Driver::Systemd, _) => "",
            (Driver::Cgroupfs, _) => "",
        };
        let suffix = if self.driver == Driver::Systemd {
            ".scope"
        } else {
            ""
        };
        format!("{pod}/{prefix}{}{suffix}", c.id)
    }

    fn path(&self, components: &[String]) -> String {
        match self.driver {
            Driver::Cgroupfs => components.iter().fold(String::new(), |mut p, c| {
                p.push('/');
                p.push_str(c);
                p
            }),
            Driver::Systemd => {
                // systemd's slice expansion: a-b-c.slice lives in
                // /a.slice/a-b.slice/a-b-c.slice.
                let mut path = String::new();
                let mut name = String::new();
                for c in components {
                    if !name.is_empty() {
                        name.push('-');
                    }
                    name.push_str(&c.replace('-', "_"));
                    path.push('/');
                    path.push_str(&name);
                    path.push_str(".slice");
                }
                path
            }
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} driver, cgroup root /{}",
            self.driver,
            self.root.join("/")
        )
    }
}

/// How deep below the mount [`detect`] looks for `kubepods`.
const MAX_ROOT_DEPTH: usize = 3;

/// The kubelet layouts whose `kubepods` cgroup exists under `mount`, in
/// path order. Usually one; both drivers can show up only on a node whose
/// kubelet changed driver without a reboot.
pub fn detect(mount: &Path) -> Vec<Layout> {
    let mut found = Vec::new();
    let mut stack: Vec<(PathBuf, Vec<String>)> = vec![(mount.to_path_buf(), Vec::new())];
    while let Some((dir, rel)) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            let mut here = rel.clone();
            here.push(name.clone());
            if let Some(layout) = layout_at(&here) {
                found.push(layout);
            } else if here.len() < MAX_ROOT_DEPTH {
                stack.push((e.path(), here));
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

/// The layout whose `kubepods` cgroup is at `rel` (path segments below the
/// mount), if any.
fn layout_at(rel: &[String]) -> Option<Layout> {
    let (last, parents) = rel.split_last()?;
    if last == "kubepods" {
        return Some(Layout {
            driver: Driver::Cgroupfs,
            root: parents.to_vec(),
        });
    }
    let slice = last.strip_suffix(".slice")?;
    let root: Vec<String> = slice
        .strip_suffix("kubepods")?
        .split('-')
        .filter(|c| !c.is_empty())
        .map(|c| c.replace('_', "-"))
        .collect();
    let layout = Layout {
        driver: Driver::Systemd,
        root,
    };
    // Only the real expansion: `/x.slice/foo-kubepods.slice` is not a
    // kubelet's (the root slice would be `/foo.slice`).
    let expected = layout.kubepods_path();
    let actual: String = rel.iter().map(|s| format!("/{s}")).collect();
    (expected == actual).then_some(layout)
}

/// A pod found in the cgroup tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    pub layout: Layout,
    /// The pod's cgroup, relative to the mount.
    pub path: String,
    /// Its cgroup id (the kernel's; the inode of the directory).
    pub id: u64,
    /// Containers of the pod whose cgroups exist: (path, id).
    pub containers: Vec<(String, u64)>,
}

/// Finds `pod`'s cgroup under `mount` in the first of `layouts` that has
/// it. `None` until the kubelet has created it (or when the pod is on
/// another node, or gone).
pub fn locate(mount: &Path, layouts: &[Layout], pod: &PodInfo) -> Option<Located> {
    layouts.iter().find_map(|layout| {
        let path = layout.pod_path(pod.qos, &pod.uid);
        let id = cgroup::cgroup_id(&cgroup::absolute(mount, &path)).ok()?;
        let containers = pod
            .containers
            .iter()
            .filter_map(|c| {
                let p = layout.container_path(pod.qos, &pod.uid, c);
                let id = cgroup::cgroup_id(&cgroup::absolute(mount, &p)).ok()?;
                Some((p, id))
            })
            .collect();
        Some(Located {
            layout: layout.clone(),
            path,
            id,
            containers,
        })
    })
}
