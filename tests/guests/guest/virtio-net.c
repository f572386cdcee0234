/*
 * virtio-net: drives the first virtio-net PCI function (0x1af4:0x1041) on bus 0 with one
 * receive and one transmit queue, and acts as a tiny host at 10.0.0.2:
 *
 *   - answers ARP requests for 10.0.0.2 and ICMP echo requests to it;
 *   - echoes UDP datagrams sent to port 7;
 *   - on a START command (UDP port 6001) streams sequence-numbered UDP datagrams to whoever
 *     sent it, as far as the host's CREDIT commands allow;
 *   - verifies a sequence-numbered stream the host sends to UDP port 6000, acknowledging
 *     every 64 datagrams so the host can pace itself;
 *   - on BYE prints its counters and powers off.
 *
 * All in ring 3, polling the rings and sleeping on MSI-X interrupts only when idle. The
 * output protocol and parameters are documented in ../src/lib.rs.
 */
#include "virtio.h"

#define NET_PCI_DEVICE          (VIRTIO_PCI_DEVICE_BASE + 1)

#define VIRTIO_NET_F_CSUM       0
#define VIRTIO_NET_F_MTU        3
#define VIRTIO_NET_F_MAC        5
#define VIRTIO_NET_F_MRG_RXBUF  15
#define VIRTIO_NET_F_STATUS     16
#define HDR_F_NEEDS_CSUM        1

#define QUEUE_MAX               256
#define BUF_SIZE                2048
#define HDR_LEN                 12
#define ETH_LEN                 14

#define MSIX_CONFIG             0
#define MSIX_RX                 1
#define MSIX_TX                 2
#define RX_VECTOR               0x40
#define TX_VECTOR               0x41
#define CONFIG_VECTOR           0x42

#define PORT_ECHO               7
#define PORT_STREAM_IN          6000
#define PORT_CONTROL            6001
#define CMD_START               1
#define CMD_CREDIT              2
#define CMD_BYE                 3
#define ACK_EVERY               32

#define EXIT_NO_DEVICE          10
#define EXIT_BAD_CAPS           11
#define EXIT_FEATURES           12
#define EXIT_QUEUE_SETUP        13
#define EXIT_BAD_PARAM          14
#define EXIT_TIMEOUT            17
#define EXIT_PROTOCOL           19

static const uint8_t my_ip[4] = {10, 0, 0, 2};

static uint8_t rxq_mem[VIRTQ_BYTES(QUEUE_MAX)] __attribute__((aligned(4096)));
static uint8_t txq_mem[VIRTQ_BYTES(QUEUE_MAX)] __attribute__((aligned(4096)));
static uint8_t rx_bufs[QUEUE_MAX][BUF_SIZE] __attribute__((aligned(4096)));
static uint8_t tx_bufs[QUEUE_MAX][BUF_SIZE] __attribute__((aligned(4096)));

static struct virtio_pci_dev dev;
static struct virtq rxq, txq;
static uint8_t my_mac[6];
static uint16_t tx_free[QUEUE_MAX];
static unsigned tx_nfree;
static int use_csum, mergeable;
static uint32_t payload_len;

/* Counters. */
static uint64_t n_arp, n_icmp, n_echo, n_rx, n_tx, n_bad;
/* The guest -> host stream. */
static int streaming;
static uint64_t stream_total, stream_sent, stream_credit;
static uint8_t peer_mac[6], peer_ip[4];
static uint16_t peer_port;
/* The host -> guest stream. */
static uint64_t in_expected, in_errors;
static uint16_t in_ack_port;

static __attribute__((noreturn)) void die(uint8_t code, const char *fmt, ...)
{
	va_list ap;
	serial_puts("virtio-net: ");
	va_start(ap, fmt);
	vprint(fmt, ap);
	va_end(ap);
	serial_putc('\n');
	if (dev.common)
		virtio_fail(&dev);
	debug_exit(code);
}

static uint64_t param(const char *key, uint64_t dflt, uint64_t min, uint64_t max)
{
	uint64_t v = dflt;
	int r = cmdline_u64(key, &v);
	if (r < 0 || v < min || v > max)
		die(EXIT_BAD_PARAM, "bad %s (want %lu..%lu)", key, min, max);
	return v;
}

static uint16_t be16(const uint8_t *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

static uint32_t be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

static void put32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

static int same(const uint8_t *a, const uint8_t *b, unsigned n)
{
	for (unsigned i = 0; i < n; i++)
		if (a[i] != b[i])
			return 0;
	return 1;
}

static uint32_t sum16(uint32_t sum, const uint8_t *p, uint32_t n)
{
	for (uint32_t i = 0; i + 1 < n; i += 2)
		sum += be16(p + i);
	if (n & 1)
		sum += (uint32_t)p[n - 1] << 8;
	return sum;
}

static uint16_t fold(uint32_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)sum;
}

static uint32_t pseudo(const uint8_t *src, const uint8_t *dst, uint8_t proto, uint32_t len)
{
	return be16(src) + be16(src + 2) + be16(dst) + be16(dst + 2) + proto + len;
}

/* ---- Rings ---- */

static void post_rx(uint16_t i)
{
	virtq_set_desc(&rxq, i, (uint64_t)rx_bufs[i], BUF_SIZE, VIRTQ_DESC_F_WRITE, 0);
	virtq_add(&rxq, i);
}

static int reclaim_tx(void)
{
	uint32_t id, len;
	int any = 0;
	while (virtq_pop(&txq, &id, &len)) {
		if (id >= txq.size)
			die(EXIT_PROTOCOL, "transmit used id %u", id);
		tx_free[tx_nfree++] = (uint16_t)id;
		any = 1;
	}
	return any;
}

/* A transmit buffer: header zeroed, frame at +HDR_LEN. NULL if the ring is full. */
static uint8_t *tx_begin(uint16_t *slot)
{
	if (!tx_nfree)
		reclaim_tx();
	if (!tx_nfree)
		return 0;
	*slot = tx_free[--tx_nfree];
	uint8_t *b = tx_bufs[*slot];
	memset(b, 0, HDR_LEN);
	return b;
}

static void tx_add(uint16_t slot, uint32_t frame_len)
{
	virtq_set_desc(&txq, slot, (uint64_t)tx_bufs[slot], HDR_LEN + frame_len, 0, 0);
	virtq_add(&txq, slot);
	n_tx++;
}

/* Sends one frame now, waiting for ring space if needed. */
static uint8_t *tx_wait_begin(uint16_t *slot)
{
	uint8_t *b;
	uint64_t deadline = rdtsc() + tsc_hz() * 10;
	while (!(b = tx_begin(slot))) {
		virtq_kick(&txq);
		if (!virtq_wait(&txq, deadline))
			die(EXIT_TIMEOUT, "transmit ring stuck");
	}
	return b;
}

/* ---- Frames ---- */

static void eth_header(uint8_t *f, const uint8_t *dst, uint16_t type)
{
	memcpy(f, dst, 6);
	memcpy(f + 6, my_mac, 6);
	put16(f + 12, type);
}

/* IPv4 header at f for `len` bytes of payload; returns the header length (20). */
static uint32_t ip_header(uint8_t *f, const uint8_t *dst, uint8_t proto, uint32_t len,
			  uint16_t id)
{
	f[0] = 0x45;
	f[1] = 0;
	put16(f + 2, (uint16_t)(20 + len));
	put16(f + 4, id);
	put16(f + 6, 0x4000);
	f[8] = 64;
	f[9] = proto;
	put16(f + 10, 0);
	memcpy(f + 12, my_ip, 4);
	memcpy(f + 16, dst, 4);
	put16(f + 10, (uint16_t)~fold(sum16(0, f, 20)));
	return 20;
}

/* A UDP datagram to `dst` in tx buffer `b` with `len` payload bytes already at the right
 * place (b + HDR_LEN + 42). Returns the frame length. */
static uint32_t udp_finish(uint8_t *b, const uint8_t *dmac, const uint8_t *dip, uint16_t sport,
			   uint16_t dport, uint32_t len, uint16_t id)
{
	uint8_t *f = b + HDR_LEN;
	eth_header(f, dmac, 0x0800);
	ip_header(f + ETH_LEN, dip, 17, 8 + len, id);
	uint8_t *u = f + ETH_LEN + 20;
	put16(u, sport);
	put16(u + 2, dport);
	put16(u + 4, (uint16_t)(8 + len));
	put16(u + 6, 0);
	uint32_t ps = pseudo(my_ip, dip, 17, 8 + len);
	if (use_csum) {
		/* Checksum offload: the device (tap) finishes it from csum_start. */
		b[0] = HDR_F_NEEDS_CSUM;
		b[6] = ETH_LEN + 20;            /* csum_start, little endian */
		b[8] = 6;                       /* csum_offset */
		put16(u + 6, fold(ps));
	} else {
		uint16_t c = (uint16_t)~fold(sum16(ps, u, 8 + len));
		put16(u + 6, c ? c : 0xffff);
	}
	return ETH_LEN + 20 + 8 + len;
}

static void handle_arp(const uint8_t *f, uint32_t len)
{
	/* Ethernet/IPv4 request (oper 1) for our address. */
	if (len < ETH_LEN + 28 || be16(f + 14) != 1 || be16(f + 16) != 0x0800 || f[18] != 6 ||
	    f[19] != 4 || be16(f + 20) != 1 || !same(f + 38, my_ip, 4))
		return;
	uint16_t slot;
	uint8_t *b = tx_wait_begin(&slot);
	uint8_t *r = b + HDR_LEN;
	eth_header(r, f + 22, 0x0806);
	put16(r + 14, 1);
	put16(r + 16, 0x0800);
	r[18] = 6;
	r[19] = 4;
	put16(r + 20, 2);
	memcpy(r + 22, my_mac, 6);
	memcpy(r + 28, my_ip, 4);
	memcpy(r + 32, f + 22, 10);            /* their MAC and IP */
	tx_add(slot, ETH_LEN + 28);
	n_arp++;
}

static void handle_icmp(const uint8_t *f, uint32_t ihl, uint32_t ip_len)
{
	const uint8_t *icmp = f + ETH_LEN + ihl;
	uint32_t n = ip_len - ihl;
	if (n < 8 || icmp[0] != 8 || n > BUF_SIZE - HDR_LEN - ETH_LEN - 20)
		return;
	uint16_t slot;
	uint8_t *b = tx_wait_begin(&slot);
	uint8_t *r = b + HDR_LEN;
	eth_header(r, f + 6, 0x0800);
	ip_header(r + ETH_LEN, f + ETH_LEN + 12, 1, n, 0);
	uint8_t *e = r + ETH_LEN + 20;
	memcpy(e, icmp, n);
	e[0] = 0;                               /* echo reply */
	put16(e + 2, 0);
	put16(e + 2, (uint16_t)~fold(sum16(0, e, n)));
	tx_add(slot, ETH_LEN + 20 + n);
	n_icmp++;
}

static void send_ack(const uint8_t *f, uint16_t dport)
{
	uint16_t slot;
	uint8_t *b = tx_wait_begin(&slot);
	put32(b + HDR_LEN + 42, (uint32_t)in_expected);
	put32(b + HDR_LEN + 46, (uint32_t)in_errors);
	tx_add(slot, udp_finish(b, f + 6, f + ETH_LEN + 12, PORT_STREAM_IN, dport, 8, 0));
}

static void stream_in(const uint8_t *f, const uint8_t *data, uint32_t n, uint16_t sport)
{
	int ok = n >= 4 && be32(data) == (uint32_t)in_expected;
	for (uint32_t i = 4; ok && i < n; i++)
		ok = data[i] == (uint8_t)(in_expected + i);
	if (!ok)
		in_errors++;
	in_expected++;
	in_ack_port = sport;
	if (in_expected % ACK_EVERY == 0)
		send_ack(f, sport);
}

static int handle_udp(const uint8_t *f, uint32_t ihl, uint32_t ip_len, uint8_t hflags)
{
	const uint8_t *u = f + ETH_LEN + ihl;
	if (ip_len < ihl + 8)
		return 0;
	uint32_t ulen = be16(u + 4);
	if (ulen < 8 || ulen > ip_len - ihl)
		return 0;
	/* A complete checksum must verify; a partial one (checksum offload) is the host's. */
	if (!(hflags & HDR_F_NEEDS_CSUM) && be16(u + 6) != 0 &&
	    fold(sum16(pseudo(f + ETH_LEN + 12, my_ip, 17, ulen), u, ulen)) != 0xffff) {
		n_bad++;
		return 0;
	}
	uint16_t sport = be16(u), dport = be16(u + 2);
	const uint8_t *data = u + 8;
	uint32_t n = ulen - 8;
	if (dport == PORT_ECHO && n <= BUF_SIZE - HDR_LEN - 42) {
		uint16_t slot;
		uint8_t *b = tx_wait_begin(&slot);
		memcpy(b + HDR_LEN + 42, data, n);
		tx_add(slot, udp_finish(b, f + 6, f + ETH_LEN + 12, PORT_ECHO, sport, n, 0));
		n_echo++;
	} else if (dport == PORT_STREAM_IN) {
		stream_in(f, data, n, sport);
	} else if (dport == PORT_CONTROL && n >= 8) {
		uint32_t cmd = be32(data), arg = be32(data + 4);
		if (cmd == CMD_START) {
			streaming = 1;
			stream_total = arg;
			stream_sent = 0;
			memcpy(peer_mac, f + 6, 6);
			memcpy(peer_ip, f + ETH_LEN + 12, 4);
			peer_port = sport;
			print("virtio-net: stream start frames=%lu payload=%u\n", stream_total,
			      payload_len);
		} else if (cmd == CMD_CREDIT) {
			if (arg > stream_credit)
				stream_credit = arg;
		} else if (cmd == CMD_BYE) {
			return 1;
		}
	}
	return 0;
}

/* One received frame; returns 1 on BYE. */
static int handle_frame(const uint8_t *buf, uint32_t len)
{
	if (len < HDR_LEN + ETH_LEN) {
		n_bad++;
		return 0;
	}
	if (mergeable && (buf[10] | buf[11] << 8) != 1)
		die(EXIT_PROTOCOL, "num_buffers=%u for a %u-byte frame", buf[10] | buf[11] << 8,
		    len);
	uint8_t hflags = buf[0];
	const uint8_t *f = buf + HDR_LEN;
	len -= HDR_LEN;
	n_rx++;
	uint16_t type = be16(f + 12);
	if (type == 0x0806) {
		handle_arp(f, len);
		return 0;
	}
	if (type != 0x0800 || len < ETH_LEN + 20 || (f[ETH_LEN] >> 4) != 4)
		return 0;
	uint32_t ihl = (f[ETH_LEN] & 0xf) * 4u, ip_len = be16(f + ETH_LEN + 2);
	if (ihl < 20 || ip_len < ihl || ip_len > len - ETH_LEN ||
	    fold(sum16(0, f + ETH_LEN, ihl)) != 0xffff || !same(f + ETH_LEN + 16, my_ip, 4)) {
		n_bad++;
		return 0;
	}
	if (f[ETH_LEN + 9] == 1)
		handle_icmp(f, ihl, ip_len);
	else if (f[ETH_LEN + 9] == 17)
		return handle_udp(f, ihl, ip_len, hflags);
	return 0;
}

static int poll_rx(int *bye)
{
	uint32_t id, len;
	int any = 0;
	while (virtq_pop(&rxq, &id, &len)) {
		if (id >= rxq.size || len > BUF_SIZE)
			die(EXIT_PROTOCOL, "receive used id %u len %u", id, len);
		if (handle_frame(rx_bufs[id], len))
			*bye = 1;
		post_rx((uint16_t)id);
		any = 1;
	}
	if (any)
		virtq_kick(&rxq);
	return any;
}

static int stream_out(void)
{
	int any = 0;
	while (streaming && stream_sent < stream_total && stream_sent < stream_credit) {
		uint16_t slot;
		uint8_t *b = tx_begin(&slot);
		if (!b)
			break;
		uint8_t *data = b + HDR_LEN + 42;
		put32(data, (uint32_t)stream_sent);
		for (uint32_t i = 4; i < payload_len; i++)
			data[i] = (uint8_t)(stream_sent + i);
		tx_add(slot, udp_finish(b, peer_mac, peer_ip, PORT_CONTROL, peer_port, payload_len,
					(uint16_t)stream_sent));
		stream_sent++;
		any = 1;
	}
	if (streaming && stream_sent == stream_total) {
		streaming = 0;
		print("virtio-net: stream sent=%lu\n", stream_sent);
	}
	return any;
}

static void setup(int want_event_idx, int want_mrg, int want_csum)
{
	int r = virtio_pci_find(NET_PCI_DEVICE, 0, &dev);
	if (r == VIRTIO_ERR_NO_DEVICE)
		die(EXIT_NO_DEVICE, "no virtio-net PCI function on bus 0");
	if (r)
		die(EXIT_BAD_CAPS, "missing or unusable virtio/MSI-X capabilities");
	if (dev.msix_vectors < 3)
		die(EXIT_BAD_CAPS, "only %u MSI-X vectors", dev.msix_vectors);
	uint64_t wanted = VIRTIO_BIT(VIRTIO_F_VERSION_1) | VIRTIO_BIT(VIRTIO_NET_F_MAC) |
			  VIRTIO_BIT(VIRTIO_NET_F_STATUS) | VIRTIO_BIT(VIRTIO_NET_F_MTU);
	if (want_event_idx)
		wanted |= VIRTIO_BIT(VIRTIO_F_EVENT_IDX);
	if (want_mrg)
		wanted |= VIRTIO_BIT(VIRTIO_NET_F_MRG_RXBUF);
	if (want_csum)
		wanted |= VIRTIO_BIT(VIRTIO_NET_F_CSUM);
	if (virtio_pci_negotiate(&dev, wanted))
		die(EXIT_FEATURES, "feature negotiation failed (offered 0x%lx)", dev.offered);
	if (!(dev.features & VIRTIO_BIT(VIRTIO_NET_F_MAC)))
		die(EXIT_FEATURES, "no MAC address offered");
	mergeable = !!(dev.features & VIRTIO_BIT(VIRTIO_NET_F_MRG_RXBUF));
	use_csum = !!(dev.features & VIRTIO_BIT(VIRTIO_NET_F_CSUM));

	virtio_msix_route(&dev, MSIX_CONFIG, CONFIG_VECTOR);
	virtio_msix_route(&dev, MSIX_RX, RX_VECTOR);
	virtio_msix_route(&dev, MSIX_TX, TX_VECTOR);
	virtio_msix_enable(&dev);
	if (virtio_config_vector(&dev, MSIX_CONFIG) != MSIX_CONFIG)
		die(EXIT_QUEUE_SETUP, "config_msix_vector did not read back");
	if (virtq_init(&dev, &rxq, 0, QUEUE_MAX, rxq_mem, MSIX_RX) ||
	    virtq_init(&dev, &txq, 1, QUEUE_MAX, txq_mem, MSIX_TX))
		die(EXIT_QUEUE_SETUP, "cannot set up the queues");
	for (uint16_t i = 0; i < rxq.size; i++)
		post_rx(i);
	tx_nfree = 0;
	for (uint16_t i = txq.size; i > 0; i--)
		tx_free[tx_nfree++] = (uint16_t)(i - 1);
	uint8_t status = virtio_driver_ok(&dev);
	if (!(status & VIRTIO_STATUS_DRIVER_OK) || (status & VIRTIO_STATUS_NEEDS_RESET))
		die(EXIT_QUEUE_SETUP, "device did not start: status=0x%x", status);
	virtq_kick(&rxq);

	uint32_t w0 = virtio_config_read32(&dev, 0), w1 = virtio_config_read32(&dev, 4);
	uint32_t w2 = virtio_config_read32(&dev, 8);
	for (int i = 0; i < 4; i++)
		my_mac[i] = (uint8_t)(w0 >> (8 * i));
	my_mac[4] = (uint8_t)w1;
	my_mac[5] = (uint8_t)(w1 >> 8);
	uint16_t link = (uint16_t)(w1 >> 16);
	uint16_t mtu = (uint16_t)(w2 >> 16);
	print("virtio-net: ready mac=%02x:%02x:%02x:%02x:%02x:%02x link=%u mtu=%u features=0x%lx "
	      "queue-size=%u mrg=%u csum=%u event-idx=%u\n", my_mac[0], my_mac[1], my_mac[2],
	      my_mac[3], my_mac[4], my_mac[5], link & 1, mtu, dev.features, rxq.size, mergeable,
	      use_csum, rxq.event_idx);
}

void guest_main(void)
{
	int want_event_idx = (int)param("virtio-net.event_idx", 1, 0, 1);
	int want_mrg = (int)param("virtio-net.mrg", 1, 0, 1);
	int want_csum = (int)param("virtio-net.csum", 1, 0, 1);
	payload_len = (uint32_t)param("virtio-net.payload", 64, 8, 1472);
	uint64_t idle_s = param("virtio-net.idle", 60, 1, 3600);

	lapic_enable();
	uint64_t hz = tsc_hz();
	virtio_timer_start();
	setup(want_event_idx, want_mrg, want_csum);

	uint64_t last_work = rdtsc();
	int bye = 0;
	while (!bye) {
		int work = reclaim_tx();
		work |= poll_rx(&bye);
		work |= stream_out();
		if (n_tx && txq.avail_idx != txq.kicked_idx)
			virtq_kick(&txq);
		uint64_t now = rdtsc();
		if (work) {
			last_work = now;
			continue;
		}
		if (now - last_work < hz / 5000)
			continue;               /* spin ~200 us before sleeping */
		if (now - last_work > idle_s * hz)
			die(EXIT_TIMEOUT, "idle for %lu s", idle_s);
		uint32_t seen = irq_total;
		int ready = virtq_arm(&rxq);
		if (streaming || tx_nfree < txq.size)
			ready |= virtq_arm(&txq);
		if (!ready)
			sys_wait_irq(seen);
	}
	/* Let the last replies go out. */
	virtq_kick(&txq);
	print("virtio-net: stream-in received=%lu errors=%lu\n", in_expected, in_errors);
	print("virtio-net: counters rx=%lu tx=%lu arp=%lu icmp=%lu echo=%lu bad=%lu "
	      "interrupts=%u\n", n_rx, n_tx, n_arp, n_icmp, n_echo, n_bad,
	      irq_counts[RX_VECTOR] + irq_counts[TX_VECTOR]);
	print("virtio-net: ok\n");
	poweroff();
}
