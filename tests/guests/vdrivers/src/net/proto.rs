//! The little Ethernet/ARP/IPv4/ICMP/UDP the net guest speaks (no options, no fragments).

use alloc::vec::Vec;

use super::{GUEST_IP, HOST_IP};

const ETH_ARP: u16 = 0x0806;
const ETH_IP: u16 = 0x0800;

/// What the guest acts on.
pub enum Packet {
    ArpRequest {
        sender_mac: [u8; 6],
        sender_ip: [u8; 4],
    },
    ArpReply {
        sender_mac: [u8; 6],
        sender_ip: [u8; 4],
    },
    IcmpEcho {
        src_mac: [u8; 6],
        src_ip: [u8; 4],
        ip_packet: Vec<u8>,
    },
    Udp {
        src_mac: [u8; 6],
        src_ip: [u8; 4],
        src_port: u16,
        dst_port: u16,
        payload: Vec<u8>,
    },
}

pub struct Frame;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn arr<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[at..at + N]);
    out
}

impl Frame {
    /// Parses a frame addressed to `mac` (or broadcast); `None` for anything else.
    pub fn parse(f: &[u8], mac: [u8; 6]) -> Option<Packet> {
        if f.len() < 14 {
            return None;
        }
        let dst: [u8; 6] = arr(f, 0);
        if dst != mac && dst != [0xff; 6] {
            return None;
        }
        let src_mac: [u8; 6] = arr(f, 6);
        let body = &f[14..];
        match be16(f, 12) {
            ETH_ARP if body.len() >= 28 => {
                let op = be16(body, 6);
                let target: [u8; 4] = arr(body, 24);
                let (sender_mac, sender_ip) = (arr(body, 8), arr(body, 14));
                match op {
                    1 if target == GUEST_IP => Some(Packet::ArpRequest {
                        sender_mac,
                        sender_ip,
                    }),
                    2 if target == GUEST_IP => Some(Packet::ArpReply {
                        sender_mac,
                        sender_ip,
                    }),
                    _ => None,
                }
            }
            ETH_IP if body.len() >= 20 => Self::parse_ip(src_mac, body),
            _ => None,
        }
    }

    fn parse_ip(src_mac: [u8; 6], ip: &[u8]) -> Option<Packet> {
        let ihl = usize::from(ip[0] & 0xf) * 4;
        let total = usize::from(be16(ip, 2));
        if ip[0] >> 4 != 4 || ihl < 20 || total < ihl || total > ip.len() {
            return None;
        }
        if arr::<4>(ip, 16) != GUEST_IP {
            return None;
        }
        let src_ip: [u8; 4] = arr(ip, 12);
        let l4 = &ip[ihl..total];
        match ip[9] {
            1 if l4.len() >= 8 && l4[0] == 8 => Some(Packet::IcmpEcho {
                src_mac,
                src_ip,
                ip_packet: ip[..total].to_vec(),
            }),
            17 if l4.len() >= 8 => {
                let len = usize::from(be16(l4, 4));
                if len < 8 || len > l4.len() {
                    return None;
                }
                Some(Packet::Udp {
                    src_mac,
                    src_ip,
                    src_port: be16(l4, 0),
                    dst_port: be16(l4, 2),
                    payload: l4[8..len].to_vec(),
                })
            }
            _ => None,
        }
    }
}

/// Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn eth(out: &mut [u8], dst: [u8; 6], src: [u8; 6], kind: u16) {
    out[0..6].copy_from_slice(&dst);
    out[6..12].copy_from_slice(&src);
    out[12..14].copy_from_slice(&kind.to_be_bytes());
}

/// An ARP request (broadcast) for `ip`; returns the frame length.
pub fn arp_request(out: &mut [u8], mac: [u8; 6], ip: [u8; 4]) -> usize {
    arp(out, 1, mac, [0xff; 6], [0; 6], ip)
}

/// An ARP reply from us to `to_mac`/`to_ip`; returns the frame length.
pub fn arp_reply(out: &mut [u8], mac: [u8; 6], to_mac: [u8; 6], to_ip: [u8; 4]) -> usize {
    arp(out, 2, mac, to_mac, to_mac, to_ip)
}

fn arp(
    out: &mut [u8],
    op: u16,
    mac: [u8; 6],
    eth_dst: [u8; 6],
    to_mac: [u8; 6],
    to_ip: [u8; 4],
) -> usize {
    eth(out, eth_dst, mac, ETH_ARP);
    let a = &mut out[14..42];
    a[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    a[2..4].copy_from_slice(&ETH_IP.to_be_bytes());
    a[4] = 6;
    a[5] = 4;
    a[6..8].copy_from_slice(&op.to_be_bytes());
    a[8..14].copy_from_slice(&mac);
    a[14..18].copy_from_slice(&GUEST_IP);
    a[18..24].copy_from_slice(&to_mac);
    a[24..28].copy_from_slice(&to_ip);
    out[42..60].fill(0);
    60 // padded to the Ethernet minimum
}

fn ip_header(out: &mut [u8], proto: u8, dst: [u8; 4], payload_len: usize) {
    let total = (20 + payload_len) as u16;
    let h = &mut out[..20];
    h.fill(0);
    h[0] = 0x45;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[6] = 0x40; // don't fragment
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&GUEST_IP);
    h[16..20].copy_from_slice(&dst);
    let sum = checksum(h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// The echo reply to `request` (a whole IPv4 packet); returns the frame length.
pub fn icmp_reply(
    out: &mut [u8],
    mac: [u8; 6],
    to_mac: [u8; 6],
    to_ip: [u8; 4],
    request: &[u8],
) -> usize {
    let ihl = usize::from(request[0] & 0xf) * 4;
    let icmp = &request[ihl..];
    let len = icmp.len().min(out.len() - 34);
    eth(out, to_mac, mac, ETH_IP);
    ip_header(&mut out[14..], 1, to_ip, len);
    let body = &mut out[34..34 + len];
    body.copy_from_slice(&icmp[..len]);
    body[0] = 0; // echo reply
    body[2..4].fill(0);
    let sum = checksum(body);
    body[2..4].copy_from_slice(&sum.to_be_bytes());
    (34 + len).max(60)
}

/// A UDP datagram to the host (checksum 0: none, allowed for IPv4); returns the frame length.
pub fn udp(
    out: &mut [u8],
    mac: [u8; 6],
    host_mac: [u8; 6],
    src_port: u16,
    dst_port: u16,
    payload: &[u8],
) -> usize {
    let len = payload.len().min(out.len() - 42);
    eth(out, host_mac, mac, ETH_IP);
    ip_header(&mut out[14..], 17, HOST_IP, 8 + len);
    let u = &mut out[34..42];
    u[0..2].copy_from_slice(&src_port.to_be_bytes());
    u[2..4].copy_from_slice(&dst_port.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + len) as u16).to_be_bytes());
    u[6..8].fill(0);
    out[42..42 + len].copy_from_slice(&payload[..len]);
    let end = 42 + len;
    if end < 60 {
        out[end..60].fill(0);
    }
    end.max(60)
}

/// `fmt::Write` into a byte slice (truncating).
pub struct SliceWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> SliceWriter<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        SliceWriter { buf, len: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl core::fmt::Write for SliceWriter<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}
