//! The backing image: a raw file or a block device, opened once for the process's life.
//!
//! Positional I/O only (`preadv`/`pwritev`, `fallocate`, `fdatasync`), so every queue's
//! worker can use the same descriptor at once.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{fallocate, FallocateFlags};
use vm_memory::MmapRegion;

/// Logical sector of the virtio-blk protocol.
pub const SECTOR: u64 = 512;
/// Block size exposed with `--direct`: the alignment O_DIRECT may need for offsets, lengths
/// and memory on any device this runs on.
pub const DIRECT_ALIGN: u64 = 4096;
/// Length of a virtio-blk serial (GET_ID).
pub const SERIAL_LEN: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open image {}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image {} is neither a regular file nor a block device", .0.display())]
    NotADisk(PathBuf),
    #[error("cannot find the size of image {}", .path.display())]
    Size {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("serial {0:?} is longer than {SERIAL_LEN} bytes")]
    SerialTooLong(String),
    #[error("image {} holds {bytes} bytes, not one {block_size}-byte block", .path.display())]
    Empty {
        path: PathBuf,
        bytes: u64,
        block_size: u64,
    },
}

/// Options the image is opened with.
#[derive(Debug, Clone)]
pub struct DiskOptions {
    pub readonly: bool,
    pub direct: bool,
    /// GET_ID answer; `None` derives it from the image's file name.
    pub serial: Option<String>,
}

/// An open image.
#[derive(Debug)]
pub struct Disk {
    file: File,
    /// Usable size in bytes: the image's size rounded down to a whole block.
    size: u64,
    readonly: bool,
    direct: bool,
    block_size: u64,
    serial: [u8; SERIAL_LEN],
    block_device: bool,
}

/// The serial a path gets by default: its file name, cut to 20 bytes.
pub fn default_serial(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "isola-blk".to_owned());
    let mut end = name.len().min(SERIAL_LEN);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_owned()
}

impl Disk {
    pub fn open(path: &Path, options: &DiskOptions) -> Result<Disk, DiskError> {
        let serial_text = options
            .serial
            .clone()
            .unwrap_or_else(|| default_serial(path));
        if serial_text.len() > SERIAL_LEN {
            return Err(DiskError::SerialTooLong(serial_text));
        }
        let mut serial = [0u8; SERIAL_LEN];
        serial[..serial_text.len()].copy_from_slice(serial_text.as_bytes());
        let open_err = |source| DiskError::Open {
            path: path.to_owned(),
            source,
        };
        let open = |noatime: libc::c_int| {
            OpenOptions::new()
                .read(true)
                .write(!options.readonly)
                .custom_flags(noatime | if options.direct { libc::O_DIRECT } else { 0 })
                .open(path)
        };
        // No access-time updates: nobody but this process reads the image while it serves,
        // and each read would check whether to update it. Only the owner (or CAP_FOWNER) may
        // ask; anyone else opens it as it is.
        let mut file = match open(libc::O_NOATIME) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0),
            other => other,
        }
        .map_err(open_err)?;
        let kind = file.metadata().map_err(open_err)?.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(DiskError::NotADisk(path.to_owned()));
        }
        // SEEK_END gives the size of block devices as well as of files.
        let bytes = file
            .seek(SeekFrom::End(0))
            .map_err(|source| DiskError::Size {
                path: path.to_owned(),
                source,
            })?;
        let block_size = if options.direct { DIRECT_ALIGN } else { SECTOR };
        let size = bytes - bytes % block_size;
        // A disk of no blocks has nothing to serve: every request would fail.
        if size == 0 {
            return Err(DiskError::Empty {
                path: path.to_owned(),
                bytes,
                block_size,
            });
        }
        Ok(Disk {
            file,
            size,
            readonly: options.readonly,
            direct: options.direct,
            block_size,
            serial,
            block_device: kind.is_block_device(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Block size offered to the driver (BLK_SIZE), and the unit requests must align to.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    pub fn serial(&self) -> &[u8; SERIAL_LEN] {
        &self.serial
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Reads into `iov` from `offset` until every byte is transferred. A read past the end
    /// of the image (which the device never asks for) fails with `UnexpectedEof`.
    ///
    /// # Safety
    /// Each entry of `iov` names `iov_len` bytes of memory that is mapped and valid for
    /// writes for the whole call, and that no Rust reference points into meanwhile (the
    /// kernel writes it behind the compiler's back).
    pub unsafe fn read_at(&self, iov: &[libc::iovec], offset: u64) -> std::io::Result<()> {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.transfer(iov, offset, false) }
    }

    /// Writes `iov` at `offset` until every byte is transferred.
    ///
    /// # Safety
    /// Each entry of `iov` names `iov_len` bytes of memory that is mapped and valid for reads
    /// for the whole call.
    pub unsafe fn write_at(&self, iov: &[libc::iovec], offset: u64) -> std::io::Result<()> {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.transfer(iov, offset, true) }
    }

    /// # Safety
    /// As [`Disk::read_at`] (`write` false) or [`Disk::write_at`] (`write` true).
    unsafe fn transfer(
        &self,
        iov: &[libc::iovec],
        offset: u64,
        write: bool,
    ) -> std::io::Result<()> {
        let mut iov = iov.to_vec();
        let mut start = 0usize;
        let mut offset = offset;
        while start < iov.len() {
            let count = (iov.len() - start).min(libc::UIO_MAXIOV as usize) as libc::c_int;
            let off =
                libc::off_t::try_from(offset).map_err(|_| std::io::ErrorKind::InvalidInput)?;
            let fd = self.file.as_raw_fd();
            let n = if write {
                // SAFETY: `iov[start..start + count]` are valid iovec structs; each names (a
                // tail of) a range the caller promised mapped and readable for this call
                // (`write_at`'s contract). pwritev only reads those ranges.
                unsafe { libc::pwritev(fd, iov[start..].as_ptr(), count, off) }
            } else {
                // SAFETY: as above; preadv writes only into the named ranges, which the
                // caller promised mapped and writable for this call (`read_at`'s contract).
                unsafe { libc::preadv(fd, iov[start..].as_ptr(), count, off) }
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            offset += n as u64;
            start += advance(&mut iov[start..], n as usize);
        }
        Ok(())
    }

    pub fn flush(&self) -> std::io::Result<()> {
        nix::unistd::fdatasync(&self.file).map_err(std::io::Error::from)
    }

    /// Deallocates `[offset, offset + len)`. On a regular file the range reads back as
    /// zeros. Discard is a hint: where the image cannot deallocate, nothing happens.
    pub fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        match self.punch(offset, len) {
            Err(e) if is_unsupported(&e) => Ok(()),
            other => other,
        }
    }

    /// Makes `[offset, offset + len)` read as zeros; with `unmap`, deallocating it if the
    /// image can. Falls back to writing zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> std::io::Result<()> {
        let fast = if unmap && !self.block_device {
            self.punch(offset, len)
        } else {
            self.fallocate(
                FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        match fast {
            Err(e) if is_unsupported(&e) => self.write_zero_buffers(offset, len),
            other => other,
        }
    }

    fn punch(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.fallocate(
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    fn fallocate(&self, mode: FallocateFlags, offset: u64, len: u64) -> std::io::Result<()> {
        let off = libc::off_t::try_from(offset).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        let len = libc::off_t::try_from(len).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        fallocate(&self.file, mode, off, len).map_err(std::io::Error::from)
    }

    fn write_zero_buffers(&self, mut offset: u64, mut len: u64) -> std::io::Result<()> {
        const CHUNK: usize = 1 << 20;
        // Page aligned, so O_DIRECT accepts it.
        let zeros =
            MmapRegion::<()>::new(CHUNK).map_err(|e| std::io::Error::other(e.to_string()))?;
        while len > 0 {
            let n = len.min(CHUNK as u64);
            let iov = [libc::iovec {
                iov_base: zeros.as_ptr().cast(),
                iov_len: n as usize,
            }];
            // SAFETY: `iov` names `n <= CHUNK` bytes of `zeros`, a mapping this function
            // owns and keeps until it returns.
            unsafe { self.write_at(&iov, offset)? };
            offset += n;
            len -= n;
        }
        Ok(())
    }
}

fn is_unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
    )
}

/// Drops the first `n` bytes from `iov`, returning how many entries are now fully done.
pub fn advance(iov: &mut [libc::iovec], mut n: usize) -> usize {
    let mut done = 0;
    for v in iov.iter_mut() {
        if n >= v.iov_len {
            n -= v.iov_len;
            v.iov_len = 0;
            done += 1;
        } else {
            // `n < iov_len`: the new base stays inside the range the entry named.
            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
            v.iov_len -= n;
            break;
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    pub(crate) fn image(name: &str, size: u64) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("isola-blk-disk-{}-{name}.img", std::process::id()));
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        path
    }

    fn opts(readonly: bool) -> DiskOptions {
        DiskOptions {
            readonly,
            direct: false,
            serial: None,
        }
    }

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    #[test]
    fn opens_sizes_and_moves_data() {
        let path = image("rw", 4096 + 100);
        let disk = Disk::open(&path, &opts(false)).unwrap();
        // SAFETY: F_GETFL only reads the flags of an fd this test holds open.
        let flags = unsafe { libc::fcntl(disk.fd().as_raw_fd(), libc::F_GETFL) };
        assert_ne!(
            flags & libc::O_NOATIME,
            0,
            "the owner opens without atime updates"
        );
        assert_eq!(disk.size(), 4096, "rounded down to whole sectors");
        assert_eq!(&disk.serial()[..8], b"isola-bl");
        let mut a = [7u8; 300];
        let mut b = [9u8; 212];
        // SAFETY: the iovecs name arrays of this test, alive and unborrowed for the call.
        unsafe { disk.write_at(&[iov(&mut a), iov(&mut b)], 512).unwrap() };
        let mut back = [0u8; 512];
        // SAFETY: the iovecs name arrays of this test, alive and unborrowed for the call.
        unsafe { disk.read_at(&[iov(&mut back)], 512).unwrap() };
        assert!(back[..300].iter().all(|&x| x == 7) && back[300..].iter().all(|&x| x == 9));
        disk.flush().unwrap();
        disk.write_zeroes(512, 512, false).unwrap();
        // SAFETY: the iovecs name arrays of this test, alive and unborrowed for the call.
        unsafe { disk.read_at(&[iov(&mut back)], 512).unwrap() };
        assert!(back.iter().all(|&x| x == 0));
        // SAFETY: the iovecs name arrays of this test, alive and unborrowed for the call.
        unsafe { disk.write_at(&[iov(&mut a)], 1024).unwrap() };
        disk.discard(1024, 512).unwrap();
        // SAFETY: the iovecs name arrays of this test, alive and unborrowed for the call.
        unsafe { disk.read_at(&[iov(&mut back)], 1024).unwrap() };
        assert!(
            back.iter().all(|&x| x == 0),
            "a punched hole reads as zeros"
        );
        let mut past = [0u8; 512];
        // SAFETY: the iovec names an array of this test, alive and unborrowed for the call.
        assert!(unsafe { disk.read_at(&[iov(&mut past)], 4096 + 100) }.is_err());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn bad_images_and_serials_are_refused() {
        let dir = std::env::temp_dir();
        assert!(matches!(
            Disk::open(&dir, &opts(true)),
            Err(DiskError::NotADisk(_))
        ));
        assert!(matches!(
            Disk::open(&dir.join("no-such-isola-image"), &opts(true)),
            Err(DiskError::Open { .. })
        ));
        let path = image("serial", 512);
        let long = DiskOptions {
            serial: Some("x".repeat(21)),
            ..opts(true)
        };
        assert!(matches!(
            Disk::open(&path, &long),
            Err(DiskError::SerialTooLong(_))
        ));
        let disk = Disk::open(&path, &opts(true)).unwrap();
        let mut one = [1u8; 512];
        assert!(
            // SAFETY: the iovec names an array of this test, alive for the call.
            unsafe { disk.write_at(&[iov(&mut one)], 0) }.is_err(),
            "read-only descriptor"
        );
        assert_eq!(
            default_serial(Path::new("/a/b/ü-disk-with-a-long-name.img")).len(),
            20
        );
        File::open(&path)
            .unwrap()
            .read_exact_at(&mut one, 0)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn advance_skips_whole_and_partial_entries() {
        let mut a = [0u8; 4];
        let mut b = [0u8; 4];
        let base_b = b.as_mut_ptr();
        let mut v = [iov(&mut a), iov(&mut b)];
        assert_eq!(advance(&mut v, 6), 1);
        assert_eq!(v[1].iov_len, 2);
        assert_eq!(v[1].iov_base.cast::<u8>(), base_b.wrapping_add(2));
    }
}
