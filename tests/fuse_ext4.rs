//! ext4 on the FUSE disk through a loop device: mkfs.ext4, about 100 MiB of files with
//! known checksums, sync, umount, `e2fsck -fn` clean; stop serve, start it again, mount
//! read-only and verify every file.

mod common;

use common::pattern;
use common::serve::*;

fn checksum(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

#[test]
fn ext4_on_a_loop_device_survives_a_restart() {
    if !fuse_available("ext4_on_a_loop_device_survives_a_restart") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let site = make_site(tmp.path(), &[("os", "256M")]);
    let mnt = tmp.path().join("mnt");
    let fsdir = tmp.path().join("ext4");
    let served = Served::start(&site, &mnt, &[]);

    // Files of assorted sizes, ~100 MiB in all.
    let files: Vec<(String, usize)> = (0..40)
        .map(|i| {
            (
                format!("dir{}/file{i}.bin", i % 4),
                1000 + (i * 7_654_321) % (4 << 20),
            )
        })
        .collect();
    let total: usize = files.iter().map(|(_, n)| n).sum();
    assert!(total > 60 << 20, "workload too small: {total}");
    let mut sums = Vec::new();
    {
        let lo = Loop::attach(&served.disk("os"));
        let out = sh("mkfs.ext4", &["-q", "-F", &lo.0]);
        assert!(
            out.status.success(),
            "mkfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        {
            let _m = FsMount::mount(&lo.0, &fsdir, "rw");
            for (i, (name, len)) in files.iter().enumerate() {
                let p = fsdir.join(name);
                std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
                let data = pattern(i as u64 + 77, *len);
                std::fs::write(&p, &data).expect("write file");
                sums.push(checksum(&data));
            }
            assert!(sh("sync", &[]).status.success());
        }
        let fsck = sh("e2fsck", &["-fn", &lo.0]);
        assert!(
            fsck.status.success(),
            "e2fsck after umount: {}\n{}",
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );
    }
    assert!(served.stop().success(), "serve did not stop cleanly");

    let served = Served::start(&site, &mnt, &[]);
    {
        let lo = Loop::attach(&served.disk("os"));
        let _m = FsMount::mount(&lo.0, &fsdir, "ro");
        for (i, (name, len)) in files.iter().enumerate() {
            let data = std::fs::read(fsdir.join(name)).expect("read file");
            assert_eq!(data.len(), *len, "{name} length");
            assert_eq!(checksum(&data), sums[i], "{name} checksum after restart");
        }
    }
    assert!(served.stop().success());
    let out = run_ok(replog().arg("inspect").arg(&site));
    assert!(out.contains("all checksums verified: OK"), "{out}");
}
