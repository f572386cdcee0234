/*
 * virtio-gpu: drives the first virtio-gpu PCI function (0x1af4:0x1050) on bus 0, 2D only,
 * through its control queue (0) and cursor queue (1), in one of two modes:
 *
 *   draw     GET_DISPLAY_INFO and GET_EDID; a B8G8R8X8 resource of the display's size
 *            backed by guest memory in `chunks` pieces; SET_SCANOUT; the pattern of frame 1
 *            drawn in ring 3, TRANSFER_TO_HOST_2D + RESOURCE_FLUSH; a 64x64 cursor
 *            (UPDATE_CURSOR, MOVE_CURSOR). Then, if asked: waits for an MSI on vector 0x50
 *            (`wait=1`) and draws frame 2 on the same resource; or repeats full-screen
 *            transfer + flush `frames` times and reports the time; or (`reset=1`) resets
 *            the device, sets it up again from scratch and draws frame 2.
 *   hostile  malformed commands one at a time, each answered with the expected
 *            VIRTIO_GPU_RESP_ERR_*; then a frame that must still reach the display.
 *
 * The pattern, output lines, parameters and exit codes are documented in ../src/lib.rs.
 */
#include "virtio.h"

#define GPU_PCI_DEVICE      (VIRTIO_PCI_DEVICE_BASE + 16)
#define VIRTIO_GPU_F_EDID   1

#define CMD_GET_DISPLAY_INFO        0x0100
#define CMD_RESOURCE_CREATE_2D      0x0101
#define CMD_RESOURCE_UNREF          0x0102
#define CMD_SET_SCANOUT             0x0103
#define CMD_RESOURCE_FLUSH          0x0104
#define CMD_TRANSFER_TO_HOST_2D     0x0105
#define CMD_RESOURCE_ATTACH_BACKING 0x0106
#define CMD_RESOURCE_DETACH_BACKING 0x0107
#define CMD_GET_EDID                0x010a
#define CMD_UPDATE_CURSOR           0x0300
#define CMD_MOVE_CURSOR             0x0301
#define RESP_OK_NODATA              0x1100
#define RESP_OK_DISPLAY_INFO        0x1101
#define RESP_OK_EDID                0x1104
#define RESP_ERR_UNSPEC             0x1200
#define RESP_ERR_OUT_OF_MEMORY      0x1201
#define RESP_ERR_INVALID_SCANOUT_ID 0x1202
#define RESP_ERR_INVALID_RESOURCE_ID 0x1203
#define RESP_ERR_INVALID_PARAMETER  0x1205
#define RESP_UNWRITTEN              0xdeadbeef
#define FORMAT_B8G8R8X8             2
#define FORMAT_B8G8R8A8             1

#define MAX_W               1280
#define MAX_H               800
#define MAX_CHUNKS          64
#define CURSOR_DIM          64
#define FB_ID               1
#define CURSOR_ID           2
#define QUEUE_MAX           64

#define MSIX_CONFIG         0
#define MSIX_CONTROL        1
#define MSIX_CURSOR         2
#define CONFIG_VECTOR       0x41
#define CONTROL_VECTOR      0x40
#define CURSOR_VECTOR       0x42
#define GO_VECTOR           0x50    /* the test injects this MSI to start frame 2 */

#define EXIT_NO_DEVICE      10
#define EXIT_BAD_CAPS       11
#define EXIT_FEATURES       12
#define EXIT_QUEUE_SETUP    13
#define EXIT_BAD_PARAM      14
#define EXIT_COMMAND        15
#define EXIT_TIMEOUT        17
#define EXIT_HOSTILE        18
#define EXIT_PROTOCOL       19

struct rect {
	uint32_t x, y, w, h;
};

static uint8_t control_mem[VIRTQ_BYTES(QUEUE_MAX)] __attribute__((aligned(4096)));
static uint8_t cursor_mem[VIRTQ_BYTES(QUEUE_MAX)] __attribute__((aligned(4096)));
static uint8_t fb[MAX_W * MAX_H * 4] __attribute__((aligned(4096)));
static uint8_t cursor_img[CURSOR_DIM * CURSOR_DIM * 4] __attribute__((aligned(4096)));
/* One request and its response at a time on each queue. */
static uint8_t req[64 + MAX_CHUNKS * 16] __attribute__((aligned(64)));
static uint8_t resp[1100] __attribute__((aligned(64)));
static uint8_t cursor_req[64] __attribute__((aligned(64)));

static struct virtio_pci_dev dev;
static struct virtq controlq, cursorq;
static uint64_t timeout_cycles;
static uint32_t width, height;
static const char *hostile_case;

static __attribute__((noreturn)) void die(uint8_t code, const char *fmt, ...)
{
	va_list ap;
	serial_puts("virtio-gpu: ");
	va_start(ap, fmt);
	vprint(fmt, ap);
	va_end(ap);
	serial_putc('\n');
	if (dev.common)
		virtio_fail(&dev);
	debug_exit(code);
}

static void put32(uint8_t *p, unsigned at, uint32_t v)
{
	memcpy(p + at, &v, 4);
}

static void put64(uint8_t *p, unsigned at, uint64_t v)
{
	memcpy(p + at, &v, 8);
}

static uint32_t get32(const uint8_t *p, unsigned at)
{
	uint32_t v;
	memcpy(&v, p + at, 4);
	return v;
}

/* A request: header of type `type`, then `n` u32 words. Returns its length. */
static unsigned build(uint32_t type, const uint32_t *words, unsigned n)
{
	memset(req, 0, 24);
	put32(req, 0, type);
	for (unsigned i = 0; i < n; i++)
		put32(req, 24 + 4 * i, words[i]);
	return 24 + 4 * n;
}

/* Sends req[0..len) with a writable response buffer of resp_len bytes (none if 0) and waits.
 * Returns the used length. */
static uint32_t send_raw(unsigned len, unsigned resp_len)
{
	put32(resp, 0, RESP_UNWRITTEN);
	if (resp_len) {
		virtq_set_desc(&controlq, 0, (uint64_t)req, len, VIRTQ_DESC_F_NEXT, 1);
		virtq_set_desc(&controlq, 1, (uint64_t)resp, resp_len, VIRTQ_DESC_F_WRITE, 0);
	} else {
		virtq_set_desc(&controlq, 0, (uint64_t)req, len, 0, 0);
	}
	virtq_add(&controlq, 0);
	virtq_kick(&controlq);
	uint32_t id, used;
	for (;;) {
		if (!virtq_wait(&controlq, rdtsc() + timeout_cycles)) {
			if (hostile_case)
				die(EXIT_HOSTILE, "hostile %s: no answer (status=0x%x)", hostile_case,
				    virtio_status(&dev));
			die(EXIT_TIMEOUT, "no answer to command 0x%x", get32(req, 0));
		}
		if (virtq_pop(&controlq, &id, &used)) {
			if (id != 0)
				die(EXIT_PROTOCOL, "device returned descriptor %u", id);
			return used;
		}
	}
}

/* Sends a command and returns the response type. */
static uint32_t send(unsigned len, unsigned resp_len)
{
	send_raw(len, resp_len);
	return get32(resp, 0);
}

static void expect_ok(unsigned len, const char *what)
{
	uint32_t r = send(len, 24);
	if (r != RESP_OK_NODATA)
		die(EXIT_COMMAND, "%s: response 0x%x", what, r);
}

static void cursor_cmd(uint32_t type, uint32_t x, uint32_t y, uint32_t resource)
{
	memset(cursor_req, 0, sizeof(cursor_req));
	put32(cursor_req, 0, type);
	put32(cursor_req, 24, 0);       /* scanout */
	put32(cursor_req, 28, x);
	put32(cursor_req, 32, y);
	put32(cursor_req, 40, resource);
	put32(cursor_req, 44, 3);       /* hot_x */
	put32(cursor_req, 48, 5);       /* hot_y */
	virtq_set_desc(&cursorq, 0, (uint64_t)cursor_req, 56, 0, 0);
	virtq_add(&cursorq, 0);
	virtq_kick(&cursorq);
	uint32_t id, used;
	for (;;) {
		if (!virtq_wait(&cursorq, rdtsc() + timeout_cycles))
			die(EXIT_TIMEOUT, "no answer on the cursor queue");
		if (virtq_pop(&cursorq, &id, &used))
			return;
	}
}

/* ---- Commands ---- */

static unsigned create_2d(uint32_t id, uint32_t format, uint32_t w, uint32_t h)
{
	uint32_t words[] = { id, format, w, h };
	return build(CMD_RESOURCE_CREATE_2D, words, 4);
}

/* ATTACH_BACKING of [base, base + len) in `chunks` pieces, page multiples except the last. */
static unsigned attach(uint32_t id, uint64_t base, uint64_t len, unsigned chunks)
{
	uint64_t piece = (len / chunks + 4095) & ~4095ull;
	unsigned n = 0;
	for (uint64_t off = 0; off < len; off += piece, n++) {
		uint64_t l = len - off < piece ? len - off : piece;
		put64(req, 32 + 16 * n, base + off);
		put32(req, 40 + 16 * n, (uint32_t)l);
		put32(req, 44 + 16 * n, 0);
	}
	uint32_t words[] = { id, n };
	build(CMD_RESOURCE_ATTACH_BACKING, words, 2);
	return 32 + 16 * n;
}

static unsigned set_scanout(uint32_t scanout, uint32_t id, struct rect r)
{
	uint32_t words[] = { r.x, r.y, r.w, r.h, scanout, id };
	return build(CMD_SET_SCANOUT, words, 6);
}

static unsigned transfer(uint32_t id, struct rect r, uint64_t offset)
{
	uint32_t words[] = { r.x, r.y, r.w, r.h, 0, 0, id, 0 };
	build(CMD_TRANSFER_TO_HOST_2D, words, 8);
	put64(req, 40, offset);
	return 56;
}

static unsigned flush(uint32_t id, struct rect r)
{
	uint32_t words[] = { r.x, r.y, r.w, r.h, id, 0 };
	return build(CMD_RESOURCE_FLUSH, words, 6);
}

/* ---- The picture (the tests compute it independently, see src/lib.rs) ---- */

static void draw(uint32_t frame)
{
	uint32_t *p = (uint32_t *)fb;
	for (uint32_t y = 0; y < height; y++)
		for (uint32_t x = 0; x < width; x++) {
			uint32_t b = (x * 5 + frame * 40) & 0xff;
			uint32_t g = (y * 3 + (x >> 8) * 64) & 0xff;
			uint32_t r = ((x ^ y) + frame * 100) & 0xff;
			p[y * width + x] = b | g << 8 | r << 16 | 0xffu << 24;
		}
}

static void draw_cursor(void)
{
	uint32_t *p = (uint32_t *)cursor_img;
	for (uint32_t y = 0; y < CURSOR_DIM; y++)
		for (uint32_t x = 0; x < CURSOR_DIM; x++)
			p[y * CURSOR_DIM + x] = (x * 4) | (y * 4) << 8 | 0x80u << 16 | (x + y < 64 ? 0xffu : 0) << 24;
}

static struct rect screen(void)
{
	return (struct rect){ 0, 0, width, height };
}

static void show_frame(uint32_t frame)
{
	draw(frame);
	expect_ok(transfer(FB_ID, screen(), 0), "TRANSFER_TO_HOST_2D");
	expect_ok(flush(FB_ID, screen()), "RESOURCE_FLUSH");
	print("virtio-gpu: frame %u flushed %ux%u\n", frame, width, height);
}

/* ---- Set-up ---- */

static uint64_t param(const char *key, uint64_t dflt, uint64_t min, uint64_t max)
{
	uint64_t v = dflt;
	int r = cmdline_u64(key, &v);
	if (r < 0 || v < min || v > max)
		die(EXIT_BAD_PARAM, "bad %s (want %lu..%lu)", key, min, max);
	return v;
}

static void setup(void)
{
	int r = virtio_pci_find(GPU_PCI_DEVICE, 0, &dev);
	if (r == VIRTIO_ERR_NO_DEVICE)
		die(EXIT_NO_DEVICE, "no virtio-gpu PCI function on bus 0");
	if (r)
		die(EXIT_BAD_CAPS, "missing or unusable virtio/MSI-X capabilities");
	if (dev.msix_vectors < 3)
		die(EXIT_BAD_CAPS, "only %u MSI-X vectors", dev.msix_vectors);
	uint64_t wanted = VIRTIO_BIT(VIRTIO_F_VERSION_1) | VIRTIO_BIT(VIRTIO_GPU_F_EDID);
	if (virtio_pci_negotiate(&dev, wanted))
		die(EXIT_FEATURES, "feature negotiation failed (offered 0x%lx)", dev.offered);
	virtio_msix_route(&dev, MSIX_CONFIG, CONFIG_VECTOR);
	virtio_msix_route(&dev, MSIX_CONTROL, CONTROL_VECTOR);
	virtio_msix_route(&dev, MSIX_CURSOR, CURSOR_VECTOR);
	virtio_msix_enable(&dev);
	if (virtio_config_vector(&dev, MSIX_CONFIG) != MSIX_CONFIG)
		die(EXIT_QUEUE_SETUP, "config_msix_vector did not read back");
	if (virtq_init(&dev, &controlq, 0, QUEUE_MAX, control_mem, MSIX_CONTROL) ||
	    virtq_init(&dev, &cursorq, 1, QUEUE_MAX, cursor_mem, MSIX_CURSOR))
		die(EXIT_QUEUE_SETUP, "cannot set up the queues");
	uint8_t status = virtio_driver_ok(&dev);
	if (!(status & VIRTIO_STATUS_DRIVER_OK) || (status & VIRTIO_STATUS_NEEDS_RESET))
		die(EXIT_QUEUE_SETUP, "device did not start: status=0x%x", status);
	print("virtio-gpu: features=0x%lx scanouts=%u\n", dev.features,
	      virtio_config_read32(&dev, 8));

	if (send(build(CMD_GET_DISPLAY_INFO, 0, 0), 24 + 16 * 24) != RESP_OK_DISPLAY_INFO)
		die(EXIT_COMMAND, "GET_DISPLAY_INFO: response 0x%x", get32(resp, 0));
	width = get32(resp, 24 + 8);
	height = get32(resp, 24 + 12);
	print("virtio-gpu: display %ux%u enabled=%u\n", width, height, get32(resp, 24 + 16));
	if (!width || !height || width > MAX_W || height > MAX_H)
		die(EXIT_BAD_PARAM, "display %ux%u: this guest draws at most %ux%u", width, height,
		    MAX_W, MAX_H);
	if (dev.features & VIRTIO_BIT(VIRTIO_GPU_F_EDID)) {
		uint32_t words[] = { 0, 0 };
		if (send(build(CMD_GET_EDID, words, 2), sizeof(resp)) != RESP_OK_EDID)
			die(EXIT_COMMAND, "GET_EDID: response 0x%x", get32(resp, 0));
		uint8_t sum = 0;
		for (unsigned i = 0; i < 128; i++)
			sum += resp[32 + i];
		const uint8_t *e = resp + 32 + 54;
		uint32_t ew = e[2] | (e[4] >> 4) << 8, eh = e[5] | (e[7] >> 4) << 8;
		print("virtio-gpu: edid size=%u checksum=%s preferred=%ux%u\n", get32(resp, 24),
		      sum == 0 ? "ok" : "bad", ew, eh);
	}
}

/* Resource FB_ID of the display's size, backed by fb in `chunks` pieces, on scanout 0. */
static void framebuffer(unsigned chunks)
{
	expect_ok(create_2d(FB_ID, FORMAT_B8G8R8X8, width, height), "RESOURCE_CREATE_2D");
	expect_ok(attach(FB_ID, (uint64_t)fb, (uint64_t)width * height * 4, chunks),
		  "RESOURCE_ATTACH_BACKING");
	expect_ok(set_scanout(0, FB_ID, screen()), "SET_SCANOUT");
}

static void cursor(void)
{
	draw_cursor();
	struct rect c = { 0, 0, CURSOR_DIM, CURSOR_DIM };
	expect_ok(create_2d(CURSOR_ID, FORMAT_B8G8R8A8, CURSOR_DIM, CURSOR_DIM), "cursor create");
	expect_ok(attach(CURSOR_ID, (uint64_t)cursor_img, sizeof(cursor_img), 1), "cursor attach");
	expect_ok(transfer(CURSOR_ID, c, 0), "cursor transfer");
	cursor_cmd(CMD_UPDATE_CURSOR, 10, 20, CURSOR_ID);
	cursor_cmd(CMD_MOVE_CURSOR, 30, 40, CURSOR_ID);
	print("virtio-gpu: cursor set\n");
}

/* ---- Hostile mode ---- */

static void hostile_expect(const char *name, unsigned len, unsigned resp_len, uint32_t want)
{
	hostile_case = name;
	uint32_t got = send(len, resp_len);
	if (got != want)
		die(EXIT_HOSTILE, "hostile %s: response 0x%x, expected 0x%x", name, got, want);
	hostile_case = 0;
	print("virtio-gpu: hostile %s ok\n", name);
}

static void hostile(void)
{
	uint64_t bad = boot_ram_end() + (1ull << 30);
	uint32_t w[8] = { 0 };
	struct rect all = screen();
	framebuffer(1);

	hostile_expect("unknown-command", build(0x0999, 0, 0), 24, RESP_ERR_UNSPEC);
	hostile_expect("3d-command", build(0x0200, 0, 0), 24, RESP_ERR_UNSPEC);
	hostile_expect("short-header", 8, 24, RESP_ERR_UNSPEC);
	hostile_expect("short-create", build(CMD_RESOURCE_CREATE_2D, w, 0) + 8, 24,
		       RESP_ERR_INVALID_PARAMETER);
	hostile_expect("resource-id-0", create_2d(0, FORMAT_B8G8R8X8, 4, 4), 24,
		       RESP_ERR_INVALID_RESOURCE_ID);
	hostile_expect("resource-id-in-use", create_2d(FB_ID, FORMAT_B8G8R8X8, 4, 4), 24,
		       RESP_ERR_INVALID_RESOURCE_ID);
	hostile_expect("bad-format", create_2d(9, 77, 4, 4), 24, RESP_ERR_INVALID_PARAMETER);
	hostile_expect("zero-size", create_2d(9, FORMAT_B8G8R8X8, 0, 4), 24,
		       RESP_ERR_INVALID_PARAMETER);
	hostile_expect("huge-size", create_2d(9, FORMAT_B8G8R8X8, 0xffffffffu, 0xffffffffu), 24,
		       RESP_ERR_INVALID_PARAMETER);
	hostile_expect("over-budget", create_2d(9, FORMAT_B8G8R8X8, 16384, 16384), 24,
		       RESP_ERR_OUT_OF_MEMORY);
	hostile_expect("unref-unknown", build(CMD_RESOURCE_UNREF, (w[0] = 77, w), 2), 24,
		       RESP_ERR_INVALID_RESOURCE_ID);
	hostile_expect("attach-unknown", attach(77, (uint64_t)fb, 4096, 1), 24,
		       RESP_ERR_INVALID_RESOURCE_ID);
	hostile_expect("attach-twice", attach(FB_ID, (uint64_t)fb, 4096, 1), 24, RESP_ERR_UNSPEC);
	expect_ok(create_2d(3, FORMAT_B8G8R8X8, 16, 16), "create 3");
	hostile_expect("backing-outside-ram", attach(3, bad, 1024, 1), 24, RESP_ERR_UNSPEC);
	hostile_expect("backing-wraps", attach(3, ~0ull - 100, 1024, 1), 24, RESP_ERR_UNSPEC);
	w[0] = 3;
	w[1] = 0x7fffffff;
	hostile_expect("entries-missing", build(CMD_RESOURCE_ATTACH_BACKING, w, 2), 24,
		       RESP_ERR_INVALID_PARAMETER);
	hostile_expect("transfer-no-backing", transfer(3, (struct rect){ 0, 0, 16, 16 }, 0), 24,
		       RESP_ERR_UNSPEC);
	hostile_expect("transfer-unknown", transfer(77, all, 0), 24, RESP_ERR_INVALID_RESOURCE_ID);
	hostile_expect("transfer-outside", transfer(FB_ID, (struct rect){ 1, 0, width, height }, 0),
		       24, RESP_ERR_INVALID_PARAMETER);
	hostile_expect("transfer-rect-overflow",
		       transfer(FB_ID, (struct rect){ 0xffffffffu, 0, 2, 1 }, 0), 24,
		       RESP_ERR_INVALID_PARAMETER);
	hostile_expect("transfer-past-backing", transfer(FB_ID, all, 4), 24,
		       RESP_ERR_INVALID_PARAMETER);
	hostile_expect("transfer-offset-wraps",
		       transfer(FB_ID, (struct rect){ 0, 0, 1, 2 }, ~0ull - 4), 24,
		       RESP_ERR_INVALID_PARAMETER);
	hostile_expect("scanout-id", set_scanout(5, FB_ID, all), 24, RESP_ERR_INVALID_SCANOUT_ID);
	hostile_expect("scanout-unknown-resource", set_scanout(0, 77, all), 24,
		       RESP_ERR_INVALID_RESOURCE_ID);
	hostile_expect("scanout-outside", set_scanout(0, FB_ID, (struct rect){ 0, 1, width, height }),
		       24, RESP_ERR_INVALID_PARAMETER);
	hostile_expect("flush-unknown", flush(77, all), 24, RESP_ERR_INVALID_RESOURCE_ID);
	hostile_expect("flush-rect-overflow", flush(FB_ID, (struct rect){ 0, 0xfffffff0u, 1, 0x20 }),
		       24, RESP_ERR_INVALID_PARAMETER);
	hostile_expect("edid-scanout", build(CMD_GET_EDID, (w[0] = 9, w), 2), sizeof(resp),
		       RESP_ERR_INVALID_SCANOUT_ID);
	hostile_expect("detach-unknown", build(CMD_RESOURCE_DETACH_BACKING, (w[0] = 77, w), 2), 24,
		       RESP_ERR_INVALID_RESOURCE_ID);
	/* A response buffer too small for the answer: nothing written, used length 0. */
	hostile_case = "short-response";
	uint32_t used = send_raw(build(CMD_GET_DISPLAY_INFO, 0, 0), 24);
	if (used != 0 || get32(resp, 0) != RESP_UNWRITTEN)
		die(EXIT_HOSTILE, "hostile short-response: used=%u response 0x%x", used,
		    get32(resp, 0));
	/* No response buffer at all. */
	hostile_case = "no-response";
	used = send_raw(build(CMD_GET_DISPLAY_INFO, 0, 0), 0);
	if (used != 0)
		die(EXIT_HOSTILE, "hostile no-response: used=%u", used);
	hostile_case = 0;
	print("virtio-gpu: hostile short-response ok\n");
	/* Bad cursor commands (no responses on that queue): the device must go on. */
	cursor_cmd(CMD_UPDATE_CURSOR, 1, 1, 77);
	cursor_cmd(CMD_UPDATE_CURSOR, 1, 1, 3); /* not 64x64 */
	cursor_cmd(0x0999, 1, 1, 0);
	print("virtio-gpu: hostile cursor ok\n");
	show_frame(1);
	print("virtio-gpu: hostile ok\n");
}

void guest_main(void)
{
	char mode[16] = "draw";
	cmdline_get("virtio-gpu.mode", mode, sizeof(mode));
	int hostile_mode = str_eq(mode, "hostile");
	if (!hostile_mode && !str_eq(mode, "draw"))
		die(EXIT_BAD_PARAM, "bad virtio-gpu.mode=%s (draw or hostile)", mode);
	unsigned chunks = (unsigned)param("virtio-gpu.chunks", 4, 1, MAX_CHUNKS);
	int wait = (int)param("virtio-gpu.wait", 0, 0, 1);
	int reset = (int)param("virtio-gpu.reset", 0, 0, 1);
	uint64_t frames = param("virtio-gpu.frames", 0, 0, 1000000);
	uint64_t timeout_s = param("virtio-gpu.timeout", 30, 1, 3600);

	lapic_enable();
	uint64_t hz = tsc_hz();
	timeout_cycles = hz * timeout_s;
	virtio_timer_start();
	setup();

	if (hostile_mode) {
		hostile();
		poweroff();
	}
	framebuffer(chunks);
	show_frame(1);
	cursor();
	if (wait) {
		print("virtio-gpu: waiting for vector 0x%x\n", GO_VECTOR);
		uint64_t deadline = rdtsc() + timeout_cycles * 4;
		while (irq_counts[GO_VECTOR] == 0) {
			if (rdtsc() > deadline)
				die(EXIT_TIMEOUT, "no go signal");
			sys_wait_irq(irq_total);
		}
		show_frame(2);
	}
	if (reset) {
		/* Reset the device and start over: the resources are gone, so id 1 is free again. */
		print("virtio-gpu: resetting the device\n");
		setup();
		framebuffer(chunks);
		show_frame(2);
	}
	if (frames) {
		uint64_t start = rdtsc();
		for (uint64_t i = 0; i < frames; i++) {
			expect_ok(transfer(FB_ID, screen(), 0), "TRANSFER_TO_HOST_2D");
			expect_ok(flush(FB_ID, screen()), "RESOURCE_FLUSH");
		}
		uint64_t us = (rdtsc() - start) / (hz / 1000000);
		print("virtio-gpu: frames=%lu us=%lu\n", frames, us);
	}
	print("virtio-gpu: ok\n");
	poweroff();
}
