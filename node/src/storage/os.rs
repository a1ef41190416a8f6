//! What the RocksDB store reads of the machine: the free space of its file
//! system, and whether the operator reserved huge pages for its memtables.

use std::path::Path;

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

/// The size of the machine's huge pages if the operator reserved some
/// (`vm.nr_hugepages`, or `vm.nr_overcommit_hugepages` for pages taken on
/// demand), from `/proc/meminfo` and `/proc/sys/vm`; `None` otherwise.
///
/// Memtables on huge pages: a write's largest cost is the memtable
/// insert's skiplist search, a miss in the cache and in the TLB at every
/// node it visits. With its arena on 2 MiB pages the search took 5.7%
/// of the machine instead of 9.2% in workload a, and the servers' CPU
/// per operation fell by a tenth (bench/README.md, twenty-sixth look).
/// RocksDB maps each arena block with `MAP_HUGETLB` and falls back to
/// ordinary memory for a block when no reserved page is left, so a node
/// never fails for want of them.
pub(super) fn reserved_huge_page_bytes() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let overcommit = std::fs::read_to_string("/proc/sys/vm/nr_overcommit_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let bytes = huge_pages_in(&meminfo, overcommit);
    match bytes {
        Some(bytes) => tracing::info!(
            bytes,
            "memtables on reserved huge pages while free ones last"
        ),
        None => {
            tracing::info!("memtables on ordinary pages: no huge pages reserved (vm.nr_hugepages)")
        }
    }
    bytes
}

/// [`reserved_huge_page_bytes`] from the text of `/proc/meminfo` and the
/// number of pages that may be taken on demand.
fn huge_pages_in(meminfo: &str, overcommit: u64) -> Option<usize> {
    let field = |name: &str| {
        meminfo.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
    };
    let total = field("HugePages_Total")?;
    let kib = field("Hugepagesize")?;
    (total > 0 || overcommit > 0).then_some((kib * 1024) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       24000000 kB\n\
        HugePages_Total:     400\n\
        HugePages_Free:      356\n\
        Hugepagesize:       2048 kB\n";

    #[test]
    fn huge_pages_are_used_only_where_some_are_reserved() {
        assert_eq!(huge_pages_in(MEMINFO, 0), Some(2 << 20));
        let none = MEMINFO.replace("Total:     400", "Total:       0");
        assert_eq!(huge_pages_in(&none, 0), None);
        assert_eq!(huge_pages_in(&none, 64), Some(2 << 20));
        assert_eq!(huge_pages_in("MemTotal: 1 kB\n", 64), None);
    }
}
