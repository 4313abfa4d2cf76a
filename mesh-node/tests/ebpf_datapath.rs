//! The eBPF datapath against the real kernel: attach, pin, reuse on restart, replacement of
//! stale sets, uninstall, map contents, and a real capture (rewrite → sock_ops → getsockopt)
//! by child processes placed in the test's cgroups.
//!
//! Needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN), kernel BTF, cgroup v2 and bpffs, and
//! `bpftool` on PATH. Nothing is skipped: a missing requirement fails with the reason.
//! Every test works in its own cgroups and pin dir (unique names) and removes them on drop,
//! also when it fails.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    fs,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::{
        fd::{AsRawFd, FromRawFd as _, RawFd},
        unix::{ffi::OsStrExt as _, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use mesh_node::ebpf::{self, Datapath, DatapathConfig, DestKind, EbpfError, EnrollDiff};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const ROLE_ENV: &str = "MESH_EBPF_TEST_ROLE";
const TARGET_ENV: &str = "MESH_EBPF_TEST_TARGET";

// ---------------------------------------------------------------------------------------------
// Environment: unique cgroups and pin dir, removed on drop.

struct Env {
    /// `<cgroup2>/mesh-test-…`: holds `pods/` (with `pods/app/`, `pods/other/`) and `proxy*/`.
    root: PathBuf,
    pin_dir: PathBuf,
    /// A cgroup2 mount this test made (none was mounted), unmounted on drop.
    own_mount: Option<PathBuf>,
}

impl Env {
    fn new(name: &str) -> Env {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        // SAFETY: plain syscall.
        assert_eq!(unsafe { libc::geteuid() }, 0, "the eBPF datapath test needs root");
        let unique = format!(
            "mesh-test-{}-{}-{}",
            std::process::id(),
            name,
            SEQ.fetch_add(1, Ordering::Relaxed)
        );

        ensure_bpffs();
        let (cg2, own_mount) = match ebpf::cgroup2_mount_point() {
            Ok(p) => (p, None),
            Err(_) => {
                let dir = std::env::temp_dir().join(format!("{unique}-cgroup2"));
                fs::create_dir_all(&dir).expect("temp dir for cgroup2");
                mount("none", &dir, "cgroup2").expect("mounting cgroup2 (no cgroup2 mount found)");
                (dir.clone(), Some(dir))
            }
        };
        let root = cg2.join(&unique);
        let env = Env {
            root,
            pin_dir: Path::new("/sys/fs/bpf").join(&unique),
            own_mount,
        };
        for sub in ["", "pods", "pods/app", "pods/other", "proxy", "proxy2"] {
            fs::create_dir(env.root.join(sub))
                .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", env.root.join(sub).display()));
        }
        env
    }

    fn pods(&self) -> PathBuf {
        self.root.join("pods")
    }

    fn cgroup(&self, sub: &str) -> PathBuf {
        self.root.join(sub)
    }

    fn config(&self) -> DatapathConfig {
        DatapathConfig {
            pin_dir: self.pin_dir.clone(),
            pods_cgroup: self.pods(),
            proxy_cgroup: self.cgroup("proxy"),
            proxy_ipv4: Some(Ipv4Addr::LOCALHOST),
            proxy_ipv6: Some(Ipv6Addr::LOCALHOST),
            outbound_port: 15001,
            exclude_ports: vec![22, 9999],
            exclude_cidrs: vec![
                "255.255.255.255/32".parse().unwrap(),
                "fd00:dead::/32".parse().unwrap(),
            ],
            inbound_plain_port: 15006,
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Err(e) = ebpf::uninstall(&self.pin_dir) {
            eprintln!("cleanup: uninstall {}: {e}", self.pin_dir.display());
            let _ = fs::remove_dir_all(&self.pin_dir);
        }
        // Deepest first; a just-reaped child can keep a cgroup busy for a moment.
        for sub in ["pods/app", "pods/other", "pods", "proxy", "proxy2", ""] {
            let dir = self.root.join(sub);
            let deadline = Instant::now() + Duration::from_secs(5);
            while dir.exists() {
                match fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if Instant::now() > deadline => {
                        eprintln!("cleanup: rmdir {}: {e}", dir.display());
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        if let Some(dir) = &self.own_mount {
            let c = CString::new(dir.as_os_str().as_bytes()).unwrap();
            // SAFETY: valid C string.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            let _ = fs::remove_dir(dir);
        }
    }
}

fn fs_magic(path: &Path) -> Option<i64> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: zeroed statfs is a valid out-parameter; valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0).then_some(st.f_type as i64)
}

fn mount(source: &str, target: &Path, fstype: &str) -> std::io::Result<()> {
    let (s, t, f) = (
        CString::new(source).unwrap(),
        CString::new(target.as_os_str().as_bytes()).unwrap(),
        CString::new(fstype).unwrap(),
    );
    // SAFETY: valid C strings.
    if unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn ensure_bpffs() {
    let bpf = Path::new("/sys/fs/bpf");
    if fs_magic(bpf) != Some(BPF_FS_MAGIC) {
        fs::create_dir_all(bpf).expect("creating /sys/fs/bpf");
        if let Err(e) = mount("bpf", bpf, "bpf") {
            // Another test may have mounted it in the meantime.
            assert_eq!(
                fs_magic(bpf),
                Some(BPF_FS_MAGIC),
                "mounting bpffs on /sys/fs/bpf: {e}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Evidence from bpftool.

/// attach type → number of programs attached directly to `cgroup` (`bpftool -j cgroup show`).
fn attached(cgroup: &Path) -> BTreeMap<String, usize> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output()
        .expect("running bpftool (install it: apt-get install bpftool)");
    assert!(
        out.status.success(),
        "bpftool cgroup show {}: {}",
        cgroup.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = if text.trim().is_empty() {
        serde_json::Value::Array(vec![])
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("bpftool JSON {text:?}: {e}"))
    };
    let mut counts = BTreeMap::new();
    for prog in json.as_array().cloned().unwrap_or_default() {
        let kind = prog["attach_type"].as_str().unwrap_or("?").to_string();
        *counts.entry(kind).or_insert(0) += 1;
    }
    counts
}

fn expect_attached(cgroup: &Path, want: &[(&str, usize)]) {
    let want: BTreeMap<String, usize> = want.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    assert_eq!(
        attached(cgroup),
        want,
        "programs attached to {}",
        cgroup.display()
    );
}

fn expect_standard_attachments(env: &Env, proxy: &str) {
    expect_attached(
        &env.pods(),
        &[
            ("cgroup_inet4_connect", 1),
            ("cgroup_inet6_connect", 1),
            ("cgroup_sock_ops", 1),
        ],
    );
    expect_attached(&env.cgroup(proxy), &[("cgroup_getsockopt", 1)]);
}

fn counters(dp: &Datapath) -> BTreeMap<&'static str, u64> {
    dp.counters().expect("counters").into_iter().collect()
}

/// The entries of the pin dir (a set: the ABI dir's name is a hash, which sorts anywhere).
fn abi_dirs(pin_dir: &Path) -> BTreeSet<String> {
    fs::read_dir(pin_dir)
        .expect("pin dir")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------

#[test]
fn start_attaches_once_restart_reuses_uninstall_detaches() {
    let env = Env::new("reuse");
    let cfg = env.config();

    let mut dp = Datapath::start(&cfg).expect("first start");
    assert!(!dp.reused_pins(), "nothing was pinned before");
    assert_eq!(dp.links_attached(), 4);
    expect_standard_attachments(&env, "proxy");
    expect_attached(&env.cgroup("proxy2"), &[]);

    // Pin layout: <pin_dir>/<abi>/… and <pin_dir>/current -> <abi>.
    assert_eq!(dp.pin_path(), env.pin_dir.join(dp.abi()));
    assert_eq!(
        abi_dirs(&env.pin_dir),
        BTreeSet::from([dp.abi().to_string(), "current".to_string()])
    );
    assert_eq!(
        fs::read_link(env.pin_dir.join("current")).unwrap(),
        Path::new(dp.abi())
    );
    for name in [
        "mesh_config",
        "mesh_enrolled",
        "mesh_tuple_dst",
        "prog_connect4",
        "prog_getsockopt",
    ] {
        assert!(dp.pin_path().join(name).exists(), "{name} pinned");
    }
    let pods_id = ebpf::cgroup_id(&env.pods()).unwrap();
    let proxy_id = ebpf::cgroup_id(&env.cgroup("proxy")).unwrap();
    assert!(dp.pin_path().join(format!("link_connect4_cg{pods_id}")).exists());
    assert!(dp
        .pin_path()
        .join(format!("link_getsockopt_cg{proxy_id}"))
        .exists());

    // Map contents: config and exclusions.
    let proxy = dp.proxy_config().unwrap();
    assert_eq!(proxy.ipv4_addr(), Some(Ipv4Addr::LOCALHOST));
    assert_eq!(proxy.ipv6_addr(), Some(Ipv6Addr::LOCALHOST));
    assert_eq!(proxy.port, 15001);
    let (ports, cidrs) = dp.exclusions().unwrap();
    assert_eq!(ports, BTreeSet::from([22, 9999]));
    assert_eq!(
        cidrs,
        BTreeSet::from([
            "255.255.255.255/32".parse().unwrap(),
            "fd00:dead::/32".parse().unwrap()
        ])
    );

    // Enrollment: desired state, diffs.
    assert_eq!(dp.enrolled().unwrap(), BTreeSet::new());
    assert_eq!(
        dp.set_enrolled(&BTreeSet::from([1, 2, 3])).unwrap(),
        EnrollDiff {
            added: vec![1, 2, 3],
            removed: vec![]
        }
    );
    assert_eq!(
        dp.set_enrolled(&BTreeSet::from([2, 3, 4])).unwrap(),
        EnrollDiff {
            added: vec![4],
            removed: vec![1]
        }
    );
    assert_eq!(
        dp.set_enrolled(&BTreeSet::from([2, 3, 4])).unwrap(),
        EnrollDiff::default()
    );
    assert_eq!(dp.enrolled().unwrap(), BTreeSet::from([2, 3, 4]));

    // Restart (the old handle may even still be alive): re-use, attach nothing, keep the
    // enrolled set; config and exclusions become the new desired state.
    let mut cfg2 = cfg.clone();
    cfg2.exclude_ports = vec![9999, 8080];
    cfg2.exclude_cidrs = vec!["10.0.0.0/8".parse().unwrap()];
    cfg2.outbound_port = 15011;
    let dp2 = Datapath::start(&cfg2).expect("restart");
    assert!(dp2.reused_pins(), "a restart re-uses the pinned set");
    assert_eq!(dp2.links_attached(), 0);
    assert_eq!(dp2.abi(), dp.abi());
    expect_standard_attachments(&env, "proxy");
    assert_eq!(dp2.enrolled().unwrap(), BTreeSet::from([2, 3, 4]));
    assert_eq!(dp2.proxy_config().unwrap().port, 15011);
    let (ports, cidrs) = dp2.exclusions().unwrap();
    assert_eq!(ports, BTreeSet::from([8080, 9999]));
    assert_eq!(cidrs, BTreeSet::from(["10.0.0.0/8".parse().unwrap()]));
    drop(dp);
    drop(dp2);
    // Dropping the handles changes nothing in the kernel.
    expect_standard_attachments(&env, "proxy");

    ebpf::uninstall(&env.pin_dir).expect("uninstall");
    assert!(!env.pin_dir.exists(), "pin dir removed");
    expect_attached(&env.pods(), &[]);
    expect_attached(&env.cgroup("proxy"), &[]);
    ebpf::uninstall(&env.pin_dir).expect("uninstall is idempotent");
}

#[test]
fn stale_and_partial_sets_are_replaced() {
    let env = Env::new("stale");
    let cfg = env.config();
    let mut dp = Datapath::start(&cfg).expect("first start");
    dp.set_enrolled(&BTreeSet::from([7, 8])).unwrap();
    let dests = mesh_destinations(&["10.96.0.1", "fd00:96::1"]);
    dp.set_destinations(&dests).unwrap();
    let abi = dp.abi().to_string();
    drop(dp);

    // Another version's set (a different ABI dir, still attached) and a failed start's leftovers.
    fs::rename(env.pin_dir.join(&abi), env.pin_dir.join("00000000deadbeef")).unwrap();
    fs::create_dir(env.pin_dir.join("staging-0000000000000000-1")).unwrap();
    expect_standard_attachments(&env, "proxy");

    let dp = Datapath::start(&cfg).expect("start over a stale set");
    assert!(!dp.reused_pins());
    assert_eq!(
        abi_dirs(&env.pin_dir),
        BTreeSet::from([abi.clone(), "current".to_string()]),
        "stale pins removed"
    );
    // The old links are detached: exactly one of each program.
    expect_standard_attachments(&env, "proxy");
    assert_eq!(
        dp.enrolled().unwrap(),
        BTreeSet::from([7, 8]),
        "enrollment carried over"
    );
    assert_eq!(
        dp.destinations().unwrap(),
        dests,
        "mesh destinations carried over"
    );
    assert!(dp.destinations_known().unwrap(), "and capture is limited to them");
    drop(dp);

    // A partial set of this very build: a program pin is missing.
    fs::remove_file(env.pin_dir.join(&abi).join("prog_getsockopt")).unwrap();
    let dp = Datapath::start(&cfg).expect("start over a partial set");
    assert!(!dp.reused_pins(), "a partial set is rebuilt");
    assert_eq!(dp.links_attached(), 4);
    assert_eq!(
        abi_dirs(&env.pin_dir),
        BTreeSet::from([abi.clone(), "current".to_string()])
    );
    expect_standard_attachments(&env, "proxy");
    assert_eq!(dp.enrolled().unwrap(), BTreeSet::from([7, 8]));
    assert_eq!(dp.destinations().unwrap(), dests);
    drop(dp);

    // A link pin removed by hand (so detached): the set is re-used and the link re-attached.
    let pods_id = ebpf::cgroup_id(&env.pods()).unwrap();
    fs::remove_file(env.pin_dir.join(&abi).join(format!("link_sock_ops_cg{pods_id}"))).unwrap();
    expect_attached(
        &env.pods(),
        &[("cgroup_inet4_connect", 1), ("cgroup_inet6_connect", 1)],
    );
    let dp = Datapath::start(&cfg).expect("start with a missing link");
    assert!(dp.reused_pins());
    assert_eq!(dp.links_attached(), 1);
    expect_standard_attachments(&env, "proxy");
}

#[test]
fn proxy_moving_to_another_cgroup_moves_its_getsockopt_link() {
    let env = Env::new("proxymove");
    let mut cfg = env.config();
    let _dp = Datapath::start(&cfg).expect("first start");
    expect_standard_attachments(&env, "proxy");
    let old_id = ebpf::cgroup_id(&env.cgroup("proxy")).unwrap();

    cfg.proxy_cgroup = env.cgroup("proxy2");
    let dp = Datapath::start(&cfg).expect("start with the proxy in a new cgroup");
    assert!(dp.reused_pins());
    assert_eq!(dp.links_attached(), 1);
    expect_standard_attachments(&env, "proxy2");
    // The previous proxy may still be draining connections accepted on its listeners, whose
    // sockets belong to its cgroup: its getsockopt link stays while that cgroup exists.
    expect_attached(&env.cgroup("proxy"), &[("cgroup_getsockopt", 1)]);
    let old_pin = dp.pin_path().join(format!("link_getsockopt_cg{old_id}"));
    assert!(old_pin.exists());

    // Once the old cgroup is gone (its link defunct), the next start removes the pin.
    fs::remove_dir(env.cgroup("proxy")).expect("removing the old proxy cgroup");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let dp = Datapath::start(&cfg).expect("restart");
        assert!(dp.reused_pins());
        assert_eq!(dp.links_attached(), 0);
        if !old_pin.exists() {
            break;
        }
        // The kernel releases a removed cgroup's programs asynchronously.
        assert!(
            Instant::now() < deadline,
            "the defunct getsockopt link pin was never removed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    expect_standard_attachments(&env, "proxy2");
}

#[test]
fn preflight_errors_name_the_requirement() {
    let env = Env::new("preflight");
    let tmp = std::env::temp_dir().join(format!("mesh-test-{}-notbpf", std::process::id()));

    let mut cfg = env.config();
    cfg.pin_dir = tmp.join("pins");
    let err = Datapath::start(&cfg).unwrap_err();
    assert!(matches!(err, EbpfError::NotBpffs { .. }), "{err}");
    assert!(err.to_string().contains("mount -t bpf bpf /sys/fs/bpf"), "{err}");

    let mut cfg = env.config();
    cfg.pin_dir = PathBuf::from("/sys/fs/bpf");
    let err = Datapath::start(&cfg).unwrap_err();
    assert!(
        matches!(err, EbpfError::InvalidConfig(_)),
        "bpffs root refused: {err}"
    );

    let mut cfg = env.config();
    cfg.pods_cgroup = std::env::temp_dir();
    let err = Datapath::start(&cfg).unwrap_err();
    assert!(matches!(err, EbpfError::NotCgroup2 { role: "pods", .. }), "{err}");

    let mut cfg = env.config();
    cfg.proxy_cgroup = env.root.join("does-not-exist");
    let err = Datapath::start(&cfg).unwrap_err();
    assert!(
        matches!(err, EbpfError::CgroupNotFound { role: "proxy", .. }),
        "{err}"
    );

    let mut cfg = env.config();
    cfg.proxy_ipv4 = None;
    cfg.proxy_ipv6 = None;
    let err = Datapath::start(&cfg).unwrap_err();
    assert!(matches!(err, EbpfError::InvalidConfig(_)), "{err}");

    assert!(!env.pin_dir.exists(), "failed starts leave nothing pinned");
    let err = ebpf::cgroup_id(&tmp).unwrap_err();
    assert!(matches!(err, EbpfError::CgroupNotFound { .. }), "{err}");
}

#[test]
fn own_cgroup_is_a_cgroup2_dir() {
    let own = ebpf::own_cgroup().expect("own cgroup");
    assert_eq!(fs_magic(&own), Some(CGROUP2_SUPER_MAGIC), "{}", own.display());
    let id = ebpf::cgroup_id(&own).expect("cgroup id");
    assert!(id > 0);
}

// ---------------------------------------------------------------------------------------------
// Real capture: clients in an enrolled cgroup; the proxy's listeners created in the proxy cgroup.
//
// The kernel runs cgroup sockopt programs for the cgroup of the *socket*, and an accepted
// socket inherits its listener's: so a child in the proxy cgroup creates the listeners and the
// test takes copies of them (pidfd_getfd), accepts, and asks getsockopt itself.

/// Not a test: the body of the child processes the capture test spawns (the test binary runs
/// itself with `ROLE_ENV` set). Without it, it does nothing.
/// Service VIPs, as the agent would list them in the mesh destinations map.
fn mesh_destinations(ips: &[&str]) -> BTreeMap<IpAddr, DestKind> {
    let vip = DestKind {
        service_vip: true,
        workload: false,
    };
    ips.iter().map(|ip| (ip.parse().unwrap(), vip)).collect()
}

#[test]
fn zz_child_process_role() {
    let Ok(role) = std::env::var(ROLE_ENV) else { return };
    match role.as_str() {
        "client" => {
            let target: SocketAddr = std::env::var(TARGET_ENV).unwrap().parse().unwrap();
            let line = match TcpStream::connect_timeout(&target, Duration::from_secs(3)) {
                Ok(mut s) => {
                    let _ = s.write_all(b"x");
                    format!("connected {}", s.local_addr().unwrap())
                }
                Err(e) => format!("error {}", e.raw_os_error().unwrap_or(-1)),
            };
            println!("\nRESULT {line}");
        }
        "listen" => {
            let (v4, v6, port) = bind_pair();
            println!("\nRESULT {} {} {port}", v4.as_raw_fd(), v6.as_raw_fd());
            // Keep the sockets open until the test has taken its copies and closes our stdin.
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
        }
        other => panic!("unknown role {other}"),
    }
    std::process::exit(0);
}

/// Two listeners on the same free port: 127.0.0.1 and ::1.
fn bind_pair() -> (TcpListener, TcpListener, u16) {
    for _ in 0..50 {
        let v4 = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1");
        let port = v4.local_addr().unwrap().port();
        if let Ok(v6) = TcpListener::bind(("::1", port)) {
            return (v4, v6, port);
        }
    }
    panic!("no port free on both 127.0.0.1 and ::1");
}

/// Runs this test binary as a child in `cgroup` with `role`, stdin and stdout piped.
fn spawn_child(cgroup: &Path, role: &str, target: Option<&str>) -> std::process::Child {
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes()).unwrap();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "zz_child_process_role",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(ROLE_ENV, role)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    if let Some(t) = target {
        cmd.env(TARGET_ENV, t);
    }
    // SAFETY: only async-signal-safe calls (open, write, close) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Writing "0" moves the writing process itself into the cgroup.
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().expect("spawning the child")
}

/// The child's `RESULT` line, waiting at most `timeout` for it.
fn child_result(child: &mut std::process::Child, timeout: Duration) -> String {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some((_, r)) = line.split_once("RESULT ") {
                let _ = tx.send(r.to_string());
                return;
            }
        }
    });
    rx.recv_timeout(timeout).unwrap_or_else(|_| {
        let _ = child.kill();
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        panic!("child gave no result within {timeout:?}: {err}")
    })
}

fn run_client(cgroup: &Path, dial: &str) -> String {
    let mut child = spawn_child(cgroup, "client", Some(dial));
    let result = child_result(&mut child, Duration::from_secs(10));
    let _ = child.wait();
    result
}

/// Listeners created by a process in `cgroup`, copied into this process.
fn listeners_in(cgroup: &Path) -> (TcpListener, TcpListener, u16) {
    let mut child = spawn_child(cgroup, "listen", None);
    let result = child_result(&mut child, Duration::from_secs(10));
    let mut fields = result
        .split_whitespace()
        .map(|f| f.parse::<i32>().expect("number"));
    let (fd4, fd6, port) = (
        fields.next().unwrap(),
        fields.next().unwrap(),
        fields.next().unwrap(),
    );
    // SAFETY: plain syscalls; the returned fds are new and owned here.
    let take = |fd: i32| unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0);
        assert!(pidfd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
        let copy = libc::syscall(libc::SYS_pidfd_getfd, pidfd as i32, fd, 0);
        libc::close(pidfd as i32);
        assert!(copy >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
        TcpListener::from(std::os::fd::OwnedFd::from_raw_fd(copy as i32))
    };
    let (v4, v6) = (take(fd4), take(fd6));
    drop(child.stdin.take());
    let _ = child.wait();
    (v4, v6, port as u16)
}

/// Waits for a connection on `listener` until a deadline (poll(2), no sleeping).
fn accept_within(listener: &TcpListener, timeout: Duration) -> Option<TcpStream> {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as libc::c_int) };
        if n > 0 {
            return listener.accept().ok().map(|(s, _)| s);
        }
    }
}

/// `getsockopt(level, SO_ORIGINAL_DST)` on `fd`, formatted as an address or `errno=N`.
fn original_dst(fd: RawFd, level: libc::c_int, len: usize) -> String {
    let mut buf = [0u8; 28];
    let mut optlen = len as libc::socklen_t;
    // SAFETY: buf outlives the call and is at least optlen long.
    let rc = unsafe { libc::getsockopt(fd, level, 80, buf.as_mut_ptr().cast(), &mut optlen) };
    if rc != 0 {
        return format!(
            "errno={}",
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        );
    }
    let family = u16::from_ne_bytes([buf[0], buf[1]]);
    let port = u16::from_be_bytes([buf[2], buf[3]]);
    match (family as i32, optlen) {
        (libc::AF_INET, 16) => {
            SocketAddr::new(IpAddr::from([buf[4], buf[5], buf[6], buf[7]]), port).to_string()
        }
        (libc::AF_INET6, 28) => {
            let octets: [u8; 16] = buf[8..24].try_into().unwrap();
            format!("[{}]:{port}", Ipv6Addr::from(octets))
        }
        _ => format!("family={family},len={optlen}"),
    }
}

#[test]
fn enrolled_connects_are_captured_and_original_dst_answered() {
    let env = Env::new("capture");
    let (listen4, listen6, port) = listeners_in(&env.cgroup("proxy"));
    let mut cfg = env.config();
    cfg.outbound_port = port;
    let mut dp = Datapath::start(&cfg).expect("start");
    // The pod-level cgroup is enrolled; the client runs in a child cgroup of it (like a
    // container under its pod).
    let app = env.cgroup("pods/app");
    dp.set_enrolled(&BTreeSet::from([ebpf::cgroup_id(&app).unwrap()]))
        .unwrap();
    // Only these are captured; 198.51.100.11 is dialled v4-mapped, and listed as IPv4.
    let diff = dp
        .set_destinations(&mesh_destinations(&[
            "198.51.100.10",
            "2001:db8::10",
            "198.51.100.11",
        ]))
        .unwrap();
    assert_eq!(diff.added.len(), 3, "{diff:?}");
    assert_eq!(diff.left_out, 0);
    let nested = app.join("container");
    fs::create_dir(&nested).unwrap();
    struct Rmdir(PathBuf);
    impl Drop for Rmdir {
        fn drop(&mut self) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while fs::remove_dir(&self.0).is_err() && self.0.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let _nested_guard = Rmdir(nested.clone());

    // (what the client dials, the listener the rewrite must reach, the original destination
    // as looked up in the map, SOL_IP answer, SOL_IPV6 answer)
    let cases: [(&str, &TcpListener, &str, &str, &str); 3] = [
        (
            "198.51.100.10:80",
            &listen4,
            "198.51.100.10:80",
            "198.51.100.10:80",
            "[::ffff:198.51.100.10]:80",
        ),
        (
            "[2001:db8::10]:8080",
            &listen6,
            "[2001:db8::10]:8080",
            "errno",
            "[2001:db8::10]:8080",
        ),
        (
            "[::ffff:198.51.100.11]:81",
            &listen4,
            "198.51.100.11:81",
            "198.51.100.11:81",
            "[::ffff:198.51.100.11]:81",
        ),
    ];
    for (dial, listener, orig, sol_ip, sol_ipv6) in cases {
        let result = run_client(&nested, dial);
        assert!(result.starts_with("connected "), "{dial}: client got {result}");
        let conn = accept_within(listener, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{dial}: nothing reached the proxy listener"));
        let peer = conn.peer_addr().unwrap();
        let local = conn.local_addr().unwrap();
        assert_eq!(local.port(), port);
        let found = dp.original_dst(peer, local).unwrap();
        assert_eq!(
            found,
            Some(orig.parse().unwrap()),
            "{dial}: map lookup for {peer} -> {local}"
        );

        let got_ip = original_dst(conn.as_raw_fd(), libc::SOL_IP, 16);
        let got_ip6 = original_dst(conn.as_raw_fd(), libc::SOL_IPV6, 28);
        if sol_ip == "errno" {
            assert!(
                got_ip.starts_with("errno="),
                "{dial}: SOL_IP answered {got_ip} for an IPv6 original"
            );
        } else {
            assert_eq!(
                got_ip,
                sol_ip,
                "{dial}: SOL_IP SO_ORIGINAL_DST; counters {:?}",
                counters(&dp)
            );
        }
        assert_eq!(got_ip6, sol_ipv6, "{dial}: SOL_IPV6 IP6T_SO_ORIGINAL_DST");
        let mut byte = [0u8; 1];
        (&conn).read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");
    }

    // A socket of another cgroup (this test process's listener): no answer from us.
    let (own4, _own6, own_port) = bind_pair();
    let plain = TcpStream::connect(("127.0.0.1", own_port)).unwrap();
    let accepted = accept_within(&own4, Duration::from_secs(5)).expect("plain accept");
    assert!(original_dst(accepted.as_raw_fd(), libc::SOL_IP, 16).starts_with("errno="));
    drop(plain);

    // Left alone (each fails locally without a packet leaving: multicast/broadcast
    // destinations are refused by TCP; a rewrite would have connected to the proxy).
    let skipped = [
        ("pods/app/container", "255.255.255.255:80"), // excluded CIDR
        ("pods/app/container", "224.0.0.1:9999"),     // excluded port
        ("pods/app/container", "224.0.0.1:15008"),    // HBONE port
        ("pods/app/container", "224.0.0.1:80"),       // not a mesh destination
        ("pods/app/container", "[ff02::1]:80"),       // not a mesh destination (v6)
        ("pods/other", "224.0.0.1:80"),               // not enrolled
        ("pods/other", "[ff02::1]:80"),               // not enrolled (v6)
    ];
    for (cgroup, dial) in skipped {
        let result = run_client(&env.cgroup(cgroup), dial);
        assert!(
            result.starts_with("error "),
            "{dial} from {cgroup} must not be captured: {result}"
        );
    }
    assert!(accept_within(&listen4, Duration::from_millis(100)).is_none());

    let c = counters(&dp);
    let expect = [
        ("redirected_v4", 1),
        ("redirected_v6", 1),
        ("redirected_v4_mapped", 1),
        ("sockops_hit", 3),
        ("getsockopt_hit", 5),
        ("getsockopt_family_mismatch", 1),
        ("skip_excluded_cidr", 1),
        ("skip_excluded_port", 1),
        ("skip_hbone_port", 1),
        ("skip_not_enrolled", 2),
        ("skip_not_mesh_destination", 2),
    ];
    for (name, value) in expect {
        assert_eq!(c[name], value, "counter {name}; all: {c:?}");
    }
}

#[test]
fn until_the_destinations_are_first_written_every_destination_is_captured() {
    let env = Env::new("capall");
    let (listen4, _listen6, port) = listeners_in(&env.cgroup("proxy"));
    let mut cfg = env.config();
    cfg.outbound_port = port;
    let mut dp = Datapath::start(&cfg).expect("start");
    dp.set_enrolled(&BTreeSet::from([
        ebpf::cgroup_id(&env.cgroup("pods/app")).unwrap()
    ]))
    .unwrap();
    // A new set with nothing to carry over knows nothing of what the mesh serves.
    assert!(!dp.destinations_known().unwrap());
    // Multicast: TCP refuses it locally, so only a rewrite to the proxy connects.
    let dial = "224.0.0.2:80";
    let result = run_client(&env.cgroup("pods/app"), dial);
    assert!(result.starts_with("connected "), "captured meanwhile: {result}");
    assert!(accept_within(&listen4, Duration::from_secs(5)).is_some());

    dp.set_destinations(&BTreeMap::new()).unwrap();
    assert!(dp.destinations_known().unwrap());
    let result = run_client(&env.cgroup("pods/app"), dial);
    assert!(result.starts_with("error "), "not a mesh destination: {result}");
    assert_eq!(counters(&dp)["skip_not_mesh_destination"], 1);

    // A restart re-uses the set, and what it knows.
    drop(dp);
    let dp = Datapath::start(&cfg).expect("restart");
    assert!(dp.reused_pins());
    assert!(dp.destinations_known().unwrap());
}
