//! What the RocksDB store reads of the machine: the free space of its file
//! system, and whether its memtables can be mapped on reserved huge pages.

use std::path::Path;

use crate::config::HugePages;

/// Bytes available to this process on the file system holding `path`.
pub(super) fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// The only huge page size memtables are mapped with: RocksDB maps each
/// arena block and bloom filter on whole pages of the default size, and a
/// memtable of 1 GiB pages would count as full at its first write.
const HUGE_PAGE_BYTES: usize = 2 << 20;

/// The huge page size for the memtables: with `huge-pages = "try"`, if the
/// operator reserved pages of 2 MiB (`vm.nr_hugepages`, or
/// `vm.nr_overcommit_hugepages` for pages taken on demand) and no cgroup
/// of this process limits them when they are touched; logs why not
/// otherwise.
///
/// A write's largest cost is the memtable insert's skiplist search, a miss
/// in the cache and in the TLB at every node it visits. On 2 MiB pages the
/// search took 5.7% of the machine instead of 9.2% in workload a, and the
/// servers' CPU per operation fell by 5.6% (bench/README.md, twenty-sixth
/// look). RocksDB reserves each block's pages when it maps them and falls
/// back to ordinary memory for a block when none is left. What it cannot
/// fall back from is a page refused when first touched, which a cgroup's
/// `hugetlb.2MB.max` does (Kubernetes gives pods without a huge page
/// request a limit of 0): the process is killed (SIGBUS). Hence the checks
/// of the cgroups this process can see, then pages touched in a child
/// process ([`touched_in_a_child`], [`touch_pages`]) for the limits it
/// cannot see (a parent cgroup hidden by a namespace), and `"off"` as the
/// default.
pub(super) fn memtable_huge_page_bytes(setting: HugePages) -> Option<usize> {
    if setting == HugePages::Off {
        return None;
    }
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let overcommit = read("/proc/sys/vm/nr_overcommit_hugepages")
        .trim()
        .parse()
        .unwrap_or(0);
    // None reserved is the usual case (every `shoal dev` node tries).
    if let Err(why) = reserved_in(&read("/proc/meminfo"), overcommit) {
        tracing::info!("memtables on ordinary pages: {why}");
        return None;
    }
    let safe = unlimited_in(Path::new("/sys/fs/cgroup"), &read("/proc/self/cgroup"))
        .and_then(|()| touched_in_a_child(touch_pages));
    match safe {
        Ok(()) => {
            tracing::info!("memtables on reserved huge pages of 2 MiB while free ones last");
            Some(HUGE_PAGE_BYTES)
        }
        Err(why) => {
            tracing::warn!("memtables on ordinary pages, though huge pages are reserved: {why}");
            None
        }
    }
}

/// Whether `/proc/meminfo` (`meminfo`) shows huge pages of 2 MiB reserved
/// or `overcommit` of them may be taken on demand.
fn reserved_in(meminfo: &str, overcommit: u64) -> Result<(), String> {
    let field = |name: &str| {
        meminfo.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
    };
    match (field("HugePages_Total"), field("Hugepagesize")) {
        (_, Some(kib)) if kib * 1024 != HUGE_PAGE_BYTES as u64 => Err(format!(
            "the default huge page is {kib} kB, and memtables use pages of 2048 kB only"
        )),
        (Some(total), Some(_)) if total > 0 || overcommit > 0 => Ok(()),
        (Some(_), Some(_)) => Err("no huge pages are reserved (vm.nr_hugepages)".into()),
        _ => Err("/proc/meminfo shows no huge pages".into()),
    }
}

/// Whether no cgroup of this process, as `/proc/self/cgroup` (`cgroups`)
/// names them under `root`, limits huge pages of 2 MiB when they are
/// touched (v2's `hugetlb.2MB.max`, v1's `hugetlb.2MB.limit_in_bytes`), in
/// its own cgroup or any above it that this process can see.
fn unlimited_in(root: &Path, cgroups: &str) -> Result<(), String> {
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (base, file) = match controllers {
            "" => (root.to_path_buf(), "hugetlb.2MB.max"),
            c if c.split(',').any(|c| c == "hugetlb") => {
                (root.join("hugetlb"), "hugetlb.2MB.limit_in_bytes")
            }
            _ => continue,
        };
        let mut dir = base.join(path.trim_start_matches('/'));
        loop {
            let limit = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
            let limit = limit.trim();
            // v1 writes "no limit" as the largest multiple of the page size.
            let unlimited = limit.is_empty()
                || limit == "max"
                || limit.parse::<u64>().is_ok_and(|l| l >= 1 << 62);
            if !unlimited {
                return Err(format!(
                    "{} is {limit}: a huge page touched past it would kill the node",
                    dir.join(file).display()
                ));
            }
            if dir == base || !dir.pop() {
                break;
            }
        }
    }
    Ok(())
}

/// `touch` run in a child process (forked: the same cgroups and limits):
/// whether it ended well, or was refused without harm (exit code 2, as
/// a refused `mmap`, which RocksDB falls back from), rather than killed.
fn touched_in_a_child(touch: fn() -> i32) -> Result<(), String> {
    // SAFETY: the child only makes system calls and exits, never
    // allocating or taking a lock another thread may have held at the fork.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // A child killed here leaves no core file behind.
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        unsafe {
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            libc::_exit(touch())
        }
    }
    if pid < 0 {
        return Err(format!(
            "no child to try a page in: {}",
            std::io::Error::last_os_error()
        ));
    }
    let mut status = 0;
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("a child that tried a page was lost: {e}"));
        }
    }
    match (libc::WIFEXITED(status), libc::WEXITSTATUS(status)) {
        (true, 0 | 2) => Ok(()),
        (true, code) => Err(format!("a child that tried a page exited with {code}")),
        _ if libc::WIFSIGNALED(status) => Err(format!(
            "touching a huge page killed a child process (signal {}): a limit this \
             process cannot see",
            libc::WTERMSIG(status)
        )),
        _ => Err("a child that tried a page ended oddly".into()),
    }
}

/// Huge pages the probe touches: the README's reservation for one node,
/// more than a node under load used (21). A hidden limit below it is
/// caught; one above it but below what a node's memtables reach while
/// flushes lag is not (the README says so).
const PROBE_PAGES: usize = 64;

/// Maps [`PROBE_PAGES`] huge pages as RocksDB does and writes to each: 0
/// once written, 2 if the map was refused (fewer free than that: RocksDB
/// falls back then), a killed process if a write is refused.
fn touch_pages() -> i32 {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let bytes = PROBE_PAGES * HUGE_PAGE_BYTES;
    // SAFETY: a fresh private mapping, written within its bounds, unmapped.
    unsafe {
        let pages = libc::mmap(std::ptr::null_mut(), bytes, prot, flags, -1, 0);
        if pages == libc::MAP_FAILED {
            return 2;
        }
        for page in 0..PROBE_PAGES {
            std::ptr::write_volatile((pages as *mut u8).add(page * HUGE_PAGE_BYTES), 1);
        }
        libc::munmap(pages, bytes);
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       24000000 kB\n\
        HugePages_Total:     400\n\
        HugePages_Free:      356\n\
        Hugepagesize:       2048 kB\n";

    #[test]
    fn huge_pages_of_2_mib_are_used_only_where_some_are_reserved() {
        assert_eq!(reserved_in(MEMINFO, 0), Ok(()));
        let none = MEMINFO.replace("Total:     400", "Total:       0");
        assert!(reserved_in(&none, 0)
            .unwrap_err()
            .contains("vm.nr_hugepages"));
        assert_eq!(reserved_in(&none, 64), Ok(()));
        let gib = MEMINFO.replace("2048 kB", "1048576 kB");
        assert!(reserved_in(&gib, 0).unwrap_err().contains("1048576 kB"));
        assert!(reserved_in("MemTotal: 1 kB\n", 64).is_err());
        assert!(reserved_in("HugePages_Total: x\nHugepagesize: 2048 kB\n", 64).is_err());
    }

    #[test]
    fn a_cgroup_limiting_huge_pages_when_touched_rules_them_out() {
        let root = tempfile::tempdir().unwrap();
        let limit = |dir: &str, file: &str, value: &str| {
            let dir = root.path().join(dir);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(file), value).unwrap();
        };
        let v2 = "0::/pod/app\n";
        assert_eq!(
            unlimited_in(root.path(), v2),
            Ok(()),
            "no hugetlb controller"
        );
        limit("pod/app", "hugetlb.2MB.max", "max\n");
        assert_eq!(unlimited_in(root.path(), v2), Ok(()));
        limit("pod", "hugetlb.2MB.max", "0\n");
        let err = unlimited_in(root.path(), v2).unwrap_err();
        assert!(err.contains("pod/hugetlb.2MB.max is 0"), "{err}");
        limit("", "hugetlb.2MB.max", "0\n");
        assert!(unlimited_in(root.path(), "0::/\n").is_err(), "the root too");

        let v1 = "7:cpu,hugetlb:/job\n3:cpu,cpuacct:/job\n";
        limit(
            "hugetlb/job",
            "hugetlb.2MB.limit_in_bytes",
            "9223372036854771712\n",
        );
        assert_eq!(unlimited_in(root.path(), v1), Ok(()));
        limit("hugetlb/job", "hugetlb.2MB.limit_in_bytes", "4194304\n");
        assert!(unlimited_in(root.path(), v1).is_err());
        limit(
            "hugetlb/job",
            "hugetlb.2MB.limit_in_bytes",
            "9223372036854771712\n",
        );
        limit("hugetlb", "hugetlb.2MB.limit_in_bytes", "4194304\n");
        assert!(unlimited_in(root.path(), v1).is_err(), "a parent's limit");
    }

    #[test]
    fn a_page_that_kills_the_child_touching_it_rules_huge_pages_out() {
        assert_eq!(touched_in_a_child(|| 0), Ok(()));
        assert_eq!(touched_in_a_child(|| 2), Ok(()), "a refused map falls back");
        fn killed() -> i32 {
            // As a refused page does: std's handler for SIGBUS (stack
            // overflows) gives way to the default once the fault repeats.
            unsafe {
                libc::signal(libc::SIGBUS, libc::SIG_DFL);
                libc::raise(libc::SIGBUS)
            };
            0
        }
        let err = touched_in_a_child(killed).unwrap_err();
        assert!(err.contains("signal 7"), "{err}");
        // The real probe, wherever this runs: a machine without reserved
        // pages refuses the map; one with them lets it be written.
        assert_eq!(touched_in_a_child(touch_pages), Ok(()));
    }

    #[test]
    fn off_reads_nothing() {
        assert_eq!(memtable_huge_page_bytes(HugePages::Off), None);
    }
}
