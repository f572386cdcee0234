//! virtio-net through the crate's `VirtIONetRaw` (no `alloc` buffers: the guest owns them).
//! The guest is 10.0.0.2, the host 10.0.0.1 (a tap). Modes (`vdrivers.mode=`):
//!
//! * `work` (default): prints `mac=<mac> link=<0|1>` and `ready`, then serves: ARP requests for
//!   10.0.0.2, ICMP echo, UDP port 6000 (the host's stream, acknowledged to host port 5001),
//!   port 6002 (commands: 1 = send `arg` datagrams to host port 5000, 2 = credit up to `arg`,
//!   3 = bye) and port 7 (echo). Ends on bye with the counts.
//! * `resets`: `resets` rounds of a new driver (reset + initialisation) at queue size `qsize`,
//!   each sending `round <k>` to host port 7007 and waiting for its echo (ARP answered meanwhile).
//! * `qsizes`: the same round once at every power-of-two queue size the device allows.
//! * `loop`: echo rounds on one driver for `ms` milliseconds, each allowed to stall `stall` ms
//!   (a device process killed meanwhile is a pause); every 100th prints a line.
//!
//! Before its first datagram to the host a fresh driver asks for the host's MAC by ARP.
//!
//! Stream datagrams (both ways): 60 bytes, sequence number (u32 big-endian) then byte i (4..60)
//! = seq * 31 + i * 7 (mod 256).

use alloc::vec;
use alloc::vec::Vec;

use crate::pci::SpecTransport;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::{DeviceType, Transport};
use virtio_drivers::Error;

use crate::hal::{dma_pages_in_use, IdentityHal};
use crate::pci::{self, Root};
use crate::rt::{self, exit, Deadline};
use crate::{fail, say};

pub mod proto;
use proto::{Frame, Packet};

pub const GUEST_IP: [u8; 4] = [10, 0, 0, 2];
pub const HOST_IP: [u8; 4] = [10, 0, 0, 1];
const BUF: usize = 2048;
const STREAM_LEN: usize = 60;

pub fn run() {
    let mut buf = [0u8; 16];
    let mode = rt::arg("mode", &mut buf).unwrap_or("work");
    let mut root = pci::root();
    match mode {
        "work" => work::<16>(&mut root),
        "resets" => resets(&mut root),
        "qsizes" => qsizes(&mut root),
        "loop" => run_loop(&mut root),
        _ => fail!(exit::SETUP, "unknown vdrivers.mode={mode:?}"),
    }
}

/// A driver plus the buffers it has posted.
pub struct Nic<const N: usize> {
    dev: VirtIONetRaw<IdentityHal, SpecTransport, N>,
    rx: Vec<[u8; BUF]>,
    rx_token: Vec<Option<u16>>,
    tx: Vec<[u8; BUF]>,
    tx_token: Vec<Option<u16>>,
    pub mac: [u8; 6],
    pub host_mac: Option<[u8; 6]>,
    pub arp_answered: u64,
    pub icmp_answered: u64,
}

impl<const N: usize> Nic<N> {
    pub fn open(root: &mut Root, report: bool) -> Nic<N> {
        let function = pci::find(root, DeviceType::Network, 0);
        let mut transport = pci::transport(root, function);
        if report {
            pci::report_features(&mut transport);
        }
        // virtio_net_config.status (offset 6; VIRTIO_NET_S_LINK_UP = 1), which the crate reads but
        // does not expose.
        let status = transport.read_config_space::<u16>(6).unwrap_or(0);
        let dev = match VirtIONetRaw::<IdentityHal, SpecTransport, N>::new(transport) {
            Ok(dev) => dev,
            Err(e) => fail!(exit::FAILED, "VirtIONetRaw<{N}>::new: {e}"),
        };
        let mac = dev.mac_address();
        if report {
            say!("mac={} link={}", MacFmt(mac), status & 1);
        }
        let mut nic = Nic {
            dev,
            rx: vec![[0; BUF]; N],
            rx_token: vec![None; N],
            tx: vec![[0; BUF]; N],
            tx_token: vec![None; N],
            mac,
            host_mac: None,
            arp_answered: 0,
            icmp_answered: 0,
        };
        // The crate's driver needs no more than one descriptor per buffer (header and packet are
        // one buffer here), so all N receive buffers fit.
        for i in 0..N {
            nic.post_rx(i);
        }
        nic
    }

    fn post_rx(&mut self, i: usize) {
        // SAFETY: rx[i] lives in a Vec allocated once and never resized; it is not touched
        // until receive_complete returns it.
        match unsafe { self.dev.receive_begin(&mut self.rx[i]) } {
            Ok(token) => self.rx_token[i] = Some(token),
            Err(e) => fail!(exit::FAILED, "receive_begin: {e}"),
        }
    }

    /// The next received frame (its bytes after the virtio-net header), passed to `f`; the
    /// buffer is posted again afterwards.
    pub fn poll_rx<R>(&mut self, f: impl FnOnce(&mut Self, &[u8]) -> R) -> Option<R> {
        let token = self.dev.poll_receive()?;
        let Some(i) = self.rx_token.iter().position(|t| *t == Some(token)) else {
            fail!(exit::FAILED, "used rx token {token} not posted");
        };
        self.rx_token[i] = None;
        // SAFETY: the same buffer as was posted with this token.
        let (hdr, len) = match unsafe { self.dev.receive_complete(token, &mut self.rx[i]) } {
            Ok(v) => v,
            Err(e) => fail!(exit::FAILED, "receive_complete: {e}"),
        };
        let frame: [u8; BUF] = self.rx[i];
        self.post_rx(i);
        let end = (hdr + len).min(BUF);
        Some(f(self, &frame[hdr..end]))
    }

    /// Reclaims finished transmissions.
    fn reap_tx(&mut self) {
        while let Some(token) = self.dev.poll_transmit() {
            let Some(i) = self.tx_token.iter().position(|t| *t == Some(token)) else {
                fail!(exit::FAILED, "used tx token {token} not in flight");
            };
            // SAFETY: the same buffer as was submitted with this token.
            if let Err(e) = unsafe { self.dev.transmit_complete(token, &self.tx[i]) } {
                fail!(exit::FAILED, "transmit_complete: {e}");
            }
            self.tx_token[i] = None;
        }
    }

    /// Queues one frame (built by `build` into the buffer after the header; returns its length).
    /// Waits (bounded) for a free buffer. Returns false if the queue is full right now.
    pub fn try_send(&mut self, build: impl FnOnce(&mut [u8]) -> usize) -> bool {
        self.reap_tx();
        let Some(i) = self.tx_token.iter().position(|t| t.is_none()) else {
            return false;
        };
        let hdr = match self.dev.fill_buffer_header(&mut self.tx[i]) {
            Ok(n) => n,
            Err(e) => fail!(exit::FAILED, "fill_buffer_header: {e}"),
        };
        let len = build(&mut self.tx[i][hdr..]);
        // SAFETY: tx[i] is neither moved nor touched until transmit_complete.
        match unsafe { self.dev.transmit_begin(&self.tx[i][..hdr + len]) } {
            Ok(token) => {
                self.tx_token[i] = Some(token);
                true
            }
            Err(Error::QueueFull) => false,
            Err(e) => fail!(exit::FAILED, "transmit_begin: {e}"),
        }
    }

    /// [`try_send`](Self::try_send), waiting up to `ms` for room.
    pub fn send(&mut self, ms: u64, build: impl Fn(&mut [u8]) -> usize) {
        let deadline = Deadline::after_ms(ms);
        while !self.try_send(&build) {
            deadline.check("no free transmit buffer");
            core::hint::spin_loop();
        }
    }

    /// Waits (bounded) until every queued frame has been consumed by the device.
    pub fn drain_tx(&mut self, ms: u64) {
        rt::wait_for(ms, "transmit drain", || {
            self.reap_tx();
            self.tx_token.iter().all(Option::is_none).then_some(())
        });
    }

    /// Answers ARP and ICMP echo; returns the packet if it is UDP to us, for the caller.
    pub fn handle(&mut self, frame: &[u8]) -> Option<(u16, u16, Vec<u8>)> {
        match Frame::parse(frame, self.mac)? {
            Packet::ArpRequest {
                sender_mac,
                sender_ip,
            } => {
                if sender_ip == HOST_IP {
                    self.host_mac = Some(sender_mac);
                }
                let mac = self.mac;
                self.send(5000, |out| {
                    proto::arp_reply(out, mac, sender_mac, sender_ip)
                });
                self.arp_answered += 1;
                None
            }
            Packet::ArpReply {
                sender_mac,
                sender_ip,
            } => {
                if sender_ip == HOST_IP {
                    self.host_mac = Some(sender_mac);
                }
                None
            }
            Packet::IcmpEcho {
                src_mac,
                src_ip,
                ip_packet,
            } => {
                let mac = self.mac;
                self.send(5000, |out| {
                    proto::icmp_reply(out, mac, src_mac, src_ip, &ip_packet)
                });
                self.icmp_answered += 1;
                None
            }
            Packet::Udp {
                src_mac,
                src_ip,
                src_port,
                dst_port,
                payload,
            } => {
                if src_ip == HOST_IP {
                    self.host_mac = Some(src_mac);
                }
                Some((src_port, dst_port, payload))
            }
        }
    }

    /// Sends a UDP datagram from `src_port` to the host's `dst_port` (host MAC must be known).
    pub fn send_udp(&mut self, src_port: u16, dst_port: u16, payload: &[u8]) {
        let Some(host_mac) = self.host_mac else {
            fail!(exit::FAILED, "host MAC unknown");
        };
        let mac = self.mac;
        self.send(5000, |out| {
            proto::udp(out, mac, host_mac, src_port, dst_port, payload)
        });
    }
}

pub struct MacFmt(pub [u8; 6]);

impl core::fmt::Display for MacFmt {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// The stream datagram with sequence number `seq`.
pub fn stream_payload(seq: u32) -> [u8; STREAM_LEN] {
    let mut out = [0u8; STREAM_LEN];
    out[..4].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in out.iter_mut().enumerate().skip(4) {
        *b = (seq.wrapping_mul(31).wrapping_add(i as u32 * 7)) as u8;
    }
    out
}

struct Streams {
    in_seen: Vec<u64>,
    in_received: u32,
    in_errors: u32,
    out_total: u32,
    out_credit: u32,
    out_sent: u32,
    bye: bool,
}

fn work<const N: usize>(root: &mut Root) {
    let mut nic = Nic::<N>::open(root, true);
    let idle_ms = rt::arg_u64("idle", 60_000);
    say!("ready");
    let mut s = Streams {
        in_seen: vec![0; 1 << 14],
        in_received: 0,
        in_errors: 0,
        out_total: 0,
        out_credit: 0,
        out_sent: 0,
        bye: false,
    };
    let mut idle = Deadline::after_ms(idle_ms);
    while !s.bye {
        let got = nic.poll_rx(|nic, frame| nic.handle(frame));
        match got {
            Some(Some((src_port, dst_port, payload))) => {
                idle = Deadline::after_ms(idle_ms);
                udp_in(&mut nic, &mut s, src_port, dst_port, &payload);
            }
            Some(None) => idle = Deadline::after_ms(idle_ms),
            None => {
                if s.out_sent < s.out_total.min(s.out_credit) {
                    let payload = stream_payload(s.out_sent);
                    let Some(host_mac) = nic.host_mac else {
                        fail!(exit::FAILED, "host MAC unknown");
                    };
                    let mac = nic.mac;
                    if nic.try_send(|out| proto::udp(out, mac, host_mac, 6001, 5000, &payload)) {
                        s.out_sent += 1;
                        if s.out_sent == s.out_total {
                            say!("stream sent={}", s.out_sent);
                        }
                    }
                    idle = Deadline::after_ms(idle_ms);
                } else {
                    idle.check("no traffic");
                    core::hint::spin_loop();
                }
            }
        }
    }
    nic.drain_tx(5000);
    say!(
        "stream-in received={} errors={}",
        s.in_received,
        s.in_errors
    );
    say!(
        "stream-out sent={} arp={} icmp={}",
        s.out_sent,
        nic.arp_answered,
        nic.icmp_answered
    );
}

fn udp_in<const N: usize>(
    nic: &mut Nic<N>,
    s: &mut Streams,
    src_port: u16,
    dst_port: u16,
    p: &[u8],
) {
    match dst_port {
        6000 => {
            let ok = p.len() == STREAM_LEN && {
                let seq = u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
                let slot = (seq / 64) as usize;
                let fresh = slot < s.in_seen.len() && s.in_seen[slot] & (1 << (seq % 64)) == 0;
                if fresh {
                    s.in_seen[slot] |= 1 << (seq % 64);
                }
                fresh && p == stream_payload(seq)
            };
            if ok {
                s.in_received += 1;
            } else {
                s.in_errors += 1;
            }
            if s.in_received.is_multiple_of(32) || !ok {
                let mut ack = [0u8; 8];
                ack[..4].copy_from_slice(&s.in_received.to_be_bytes());
                ack[4..].copy_from_slice(&s.in_errors.to_be_bytes());
                nic.send_udp(6000, 5001, &ack);
            }
        }
        6002 if p.len() == 8 => {
            let cmd = u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
            let arg = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
            match cmd {
                1 => s.out_total = arg,
                2 => s.out_credit = s.out_credit.max(arg),
                3 => s.bye = true,
                4 => {
                    // Report the inbound count now (the host's final acknowledgement).
                    let mut ack = [0u8; 8];
                    ack[..4].copy_from_slice(&s.in_received.to_be_bytes());
                    ack[4..].copy_from_slice(&s.in_errors.to_be_bytes());
                    nic.send_udp(6000, 5001, &ack);
                }
                _ => s.in_errors += 1,
            }
        }
        7 => {
            let data: Vec<u8> = p.to_vec();
            nic.send_udp(7, src_port, &data);
        }
        _ => {}
    }
}

/// Sends `msg` from and to UDP port 7007 of the host until it comes back (the host echoes it),
/// resending every 200 ms and asking for the host's MAC by ARP while it is unknown; answers
/// ARP and ping meanwhile. Fails the run after `stall_ms`. Returns the milliseconds it took.
fn echo_once<const N: usize>(nic: &mut Nic<N>, msg: &[u8], stall_ms: u64) -> u64 {
    let start = rt::now_ms();
    let deadline = Deadline::after_ms(stall_ms);
    let mut resend = Deadline::after_ms(0);
    loop {
        if resend.passed() {
            match nic.host_mac {
                Some(_) => nic.send_udp(7007, 7007, msg),
                None => {
                    let mac = nic.mac;
                    nic.send(5000, |out| proto::arp_request(out, mac, HOST_IP));
                }
            }
            resend = Deadline::after_ms(200);
        }
        if let Some(Some((_, 7007, payload))) = nic.poll_rx(|nic, f| nic.handle(f)) {
            if payload == msg {
                return rt::now_ms().saturating_sub(start);
            }
        }
        deadline.check("echo");
        core::hint::spin_loop();
    }
}

/// `round <round> size <N>` as bytes.
fn round_msg(buf: &mut [u8; 32], round: u64, size: usize) -> usize {
    use core::fmt::Write;
    let mut w = proto::SliceWriter::new(buf);
    let _ = write!(w, "round {round} size {size}");
    w.len()
}

/// One round at queue size N: a new driver, one echo, the driver dropped (device reset).
fn echo_round<const N: usize>(root: &mut Root, round: u64, report: bool) {
    let mut nic = Nic::<N>::open(root, report);
    let mut msg = [0u8; 32];
    let len = round_msg(&mut msg, round, N);
    echo_once(&mut nic, &msg[..len], 20_000);
    nic.drain_tx(5000);
    drop(nic);
}

/// Echo rounds on one driver for `ms` milliseconds; each may stall `stall` ms (a device process
/// killed and restarted meanwhile is a pause).
fn run_loop(root: &mut Root) {
    let ms = rt::arg_u64("ms", 5000);
    let stall = rt::arg_u64("stall", 30_000);
    let mut nic = Nic::<16>::open(root, true);
    say!("ready");
    let end = Deadline::after_ms(ms);
    let mut rounds = 0u64;
    let mut longest = 0;
    let mut msg = [0u8; 32];
    while !end.passed() {
        let len = round_msg(&mut msg, rounds, 16);
        longest = longest.max(echo_once(&mut nic, &msg[..len], stall));
        rounds += 1;
        if rounds.is_multiple_of(100) {
            say!("round {rounds} echoed longest-wait-ms={longest}");
        }
    }
    nic.drain_tx(5000);
    say!("rounds={rounds} longest-wait-ms={longest}");
}

fn resets(root: &mut Root) {
    let times = rt::arg_u64("resets", 100);
    let baseline = dma_pages_in_use();
    for round in 0..times {
        echo_round::<16>(root, round, round == 0);
        if dma_pages_in_use() != baseline {
            fail!(exit::FAILED, "round {round}: DMA pages not returned");
        }
    }
    say!("resets={times} each echoed");
}

fn qsizes(root: &mut Root) {
    let function = pci::find(root, DeviceType::Network, 0);
    let mut t = pci::transport(root, function);
    let max = t.max_queue_size(0).min(t.max_queue_size(1));
    drop(t);
    say!("max-queue-size={max}");
    let mut tested = 0;
    let mut size = 1u32;
    while size <= max.min(256) {
        match size {
            1 => echo_round::<1>(root, 0, false),
            2 => echo_round::<2>(root, 0, false),
            4 => echo_round::<4>(root, 0, false),
            8 => echo_round::<8>(root, 0, false),
            16 => echo_round::<16>(root, 0, false),
            32 => echo_round::<32>(root, 0, false),
            64 => echo_round::<64>(root, 0, false),
            128 => echo_round::<128>(root, 0, false),
            _ => echo_round::<256>(root, 0, false),
        }
        say!("size={size} echoed");
        tested += 1;
        size *= 2;
    }
    say!("sizes tested={tested}");
}
