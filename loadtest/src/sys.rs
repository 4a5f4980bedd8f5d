//! Process-level helpers: the descriptor limit, and sampling a target process from /proc.

use std::fmt;
use std::str::FromStr;

use anyhow::Context;

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the resulting soft limit.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass, which outlives the calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let wanted = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
                lim = wanted;
            }
        }
    }
    lim.rlim_cur
}

/// A sample of a process's resource use.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// User + system CPU time, microseconds.
    pub cpu_us: u64,
}

/// Reads VmRSS from /proc/PID/status and utime+stime from /proc/PID/stat.
pub fn sample(pid: u32) -> anyhow::Result<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at field 3 (state).
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Sample { rss_kib, cpu_us: ticks * 1_000_000 / hz })
}

/// The target's process ids (`--pid 123,456`): one, or several whose samples are summed, so a
/// target that relays in several processes (NGINX workers) is measured as a whole. Never empty,
/// no duplicates. Written as `PID[,PID...]` on the command line; in scenario files and reports a
/// single id is a number (as before), several are a list.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "PidsRepr", into = "PidsRepr")]
pub struct Pids(Vec<u32>);

impl Pids {
    /// Checks a list of process ids: not empty, no zero, no duplicates.
    pub fn new(pids: Vec<u32>) -> Result<Self, String> {
        if pids.is_empty() {
            return Err("no process id given (write PID or PID,PID,...)".into());
        }
        for (i, &pid) in pids.iter().enumerate() {
            if pid == 0 {
                return Err("0 is not a process id".into());
            }
            if pids[..i].contains(&pid) {
                return Err(format!("process id {pid} is given twice"));
            }
        }
        Ok(Pids(pids))
    }

    /// The process ids.
    pub fn as_slice(&self) -> &[u32] {
        &self.0
    }

    /// Samples every process and sums RSS and CPU time; fails if any process cannot be read.
    pub fn sample(&self) -> anyhow::Result<Sample> {
        self.0.iter().try_fold(Sample { rss_kib: 0, cpu_us: 0 }, |sum, &pid| {
            let s = sample(pid).with_context(|| format!("pid {pid}"))?;
            Ok(Sample { rss_kib: sum.rss_kib + s.rss_kib, cpu_us: sum.cpu_us + s.cpu_us })
        })
    }
}

impl From<u32> for Pids {
    fn from(pid: u32) -> Self {
        Pids(vec![pid])
    }
}

impl FromStr for Pids {
    type Err = String;

    /// Parses `PID` or `PID,PID,...`.
    fn from_str(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Err("no process id given (write PID or PID,PID,...)".into());
        }
        let pids = text
            .split(',')
            .map(|p| {
                p.trim().parse::<u32>().map_err(|_| format!("`{p}` is not a process id (write PID or PID,PID,...)"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Pids::new(pids)
    }
}

impl fmt::Display for Pids {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, pid) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{pid}")?;
        }
        Ok(())
    }
}

/// How [`Pids`] is written in scenario files and reports: `123`, `[123, 456]` or `"123,456"`.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum PidsRepr {
    One(u32),
    Many(Vec<u32>),
    Text(String),
}

impl TryFrom<PidsRepr> for Pids {
    type Error = String;

    fn try_from(r: PidsRepr) -> Result<Self, String> {
        match r {
            PidsRepr::One(pid) => Pids::new(vec![pid]),
            PidsRepr::Many(pids) => Pids::new(pids),
            PidsRepr::Text(text) => text.parse(),
        }
    }
}

impl From<Pids> for PidsRepr {
    fn from(p: Pids) -> Self {
        match p.0[..] {
            [pid] => PidsRepr::One(pid),
            _ => PidsRepr::Many(p.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{sample, Pids, Sample};

    #[test]
    fn samples_this_process() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_kib > 0);
        assert!(super::raise_fd_limit() >= 64);
    }

    #[test]
    fn pids_parse_one_or_several() {
        assert_eq!("123".parse::<Pids>().unwrap().as_slice(), [123]);
        assert_eq!("123,456".parse::<Pids>().unwrap().as_slice(), [123, 456]);
        assert_eq!(" 1, 2,3 ".parse::<Pids>().unwrap().as_slice(), [1, 2, 3]);
        assert_eq!("123,456".parse::<Pids>().unwrap().to_string(), "123,456");
        assert_eq!(Pids::from(7).to_string(), "7");
    }

    #[test]
    fn bad_pid_lists_are_refused() {
        for bad in ["", " ", ",", "abc", "12a", "-1", "1,", ",1", "1,,2", "1;2", "0", "1,0", "5,5", "4294967296"] {
            let err = bad.parse::<Pids>().expect_err(bad);
            assert!(err.contains("process id"), "{bad:?}: {err}");
        }
        assert!(Pids::new(Vec::new()).is_err());
    }

    #[test]
    fn pids_serialize_as_a_number_when_single() {
        assert_eq!(serde_json::to_string(&Pids::from(123)).unwrap(), "123");
        assert_eq!(serde_json::to_string(&"1,2".parse::<Pids>().unwrap()).unwrap(), "[1,2]");
        #[derive(serde::Deserialize)]
        struct File {
            pid: Pids,
        }
        let read = |t: &str| toml::from_str::<File>(t).map(|f| f.pid.as_slice().to_vec());
        assert_eq!(read("pid = 123").unwrap(), [123]);
        assert_eq!(read("pid = [1, 2]").unwrap(), [1, 2]);
        assert_eq!(read(r#"pid = "1,2""#).unwrap(), [1, 2]);
        assert!(read("pid = []").is_err());
        assert!(read("pid = [3, 3]").is_err());
        assert!(read(r#"pid = "x""#).is_err());
    }

    #[test]
    fn several_pids_are_summed() {
        let spawn = || std::process::Command::new("sleep").arg("30").spawn().expect("cannot run sleep");
        let mut children = [spawn(), spawn()];
        let ids = [children[0].id(), children[1].id()];
        let add = |a: Sample, b: Sample| Sample { rss_kib: a.rss_kib + b.rss_kib, cpu_us: a.cpu_us + b.cpu_us };
        let each = || add(sample(ids[0]).unwrap(), sample(ids[1]).unwrap());
        // A freshly started `sleep` still grows while it loads; wait until it sits in nanosleep.
        let mut settled = each();
        for _ in 0..100 {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let now = each();
            if (now.rss_kib, now.cpu_us) == (settled.rss_kib, settled.cpu_us) {
                break;
            }
            settled = now;
        }
        let both = Pids::new(ids.to_vec()).unwrap().sample().unwrap();
        let single = Pids::from(ids[0]).sample().unwrap();
        let after = each();
        for c in &mut children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Equal once settled; bracketed in case a slow machine let a child grow meanwhile.
        assert!((settled.rss_kib..=after.rss_kib).contains(&both.rss_kib), "{settled:?} {both:?} {after:?}");
        assert!((settled.cpu_us..=after.cpu_us).contains(&both.cpu_us), "{settled:?} {both:?} {after:?}");
        assert!(single.rss_kib > 0 && both.rss_kib > single.rss_kib, "{both:?} vs {single:?}");
        // Our own id twice (bypassing the duplicate check) counts our RSS twice.
        let me = Pids(vec![std::process::id(); 2]).sample().unwrap();
        assert!(me.rss_kib >= sample(std::process::id()).unwrap().rss_kib);
    }

    #[test]
    fn an_unreadable_pid_fails_the_whole_sample() {
        let err = Pids::new(vec![std::process::id(), u32::MAX]).unwrap().sample().unwrap_err();
        assert!(format!("{err:#}").contains(&u32::MAX.to_string()), "{err:#}");
    }
}
