//! Measured memory: what a training step really used, for the metrics events and the benchmarks.
//!
//! - CPU: the process's peak resident memory (`VmHWM` in `/proc/self/status`), which includes
//!   libtorch's own code and buffers as well as weights, optimiser state and activations.
//! - CUDA: the caching allocator's peak is not reachable through tch 0.24 (no binding for
//!   `c10::cuda::CUDACachingAllocator::getDeviceStats`), so CUDA reports `None` until one exists.

use tch::Device;

/// Peak resident memory of this process in bytes (`VmHWM`), if the platform reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The peak memory of training on `device` so far, as the metrics events report it.
pub fn peak_bytes(device: Device) -> Option<u64> {
    match device {
        Device::Cpu => peak_rss_bytes(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_grows_with_what_the_process_touches() {
        let before = peak_rss_bytes().expect("Linux reports VmHWM");
        let block = vec![1u8; 64 << 20];
        let after = peak_rss_bytes().unwrap();
        assert!(block.iter().map(|&b| b as u64).sum::<u64>() == 64 << 20);
        assert!(after >= before + (60 << 20), "{before} -> {after}");
        assert_eq!(peak_bytes(Device::Cpu).map(|p| p >= after), Some(true));
    }
}
