/*
 * isola-probe: the few things the Linux guest's /init needs that busybox cannot do exactly
 * enough for a test. Built static by scripts/linux-guest and packed into the initramfs as
 * /bin/isola-probe. Every command prints what it saw on stdout (the serial console) and
 * exits non-zero on failure; every wait has a deadline.
 *
 *   isola-probe pattern SEED BYTES          a reproducible byte pattern on stdout (the host
 *                                           regenerates it: tests/tests/linux.rs, pattern())
 *   isola-probe udp-send IP PORT COUNT      COUNT datagrams "isola-udp SEQ" to IP:PORT
 *   isola-probe udp-recv PORT COUNT SECS    count datagrams "isola-udp SEQ" arriving on PORT
 *                                           (prints "udp-recv ready" once bound)
 *   isola-probe evdev PATH COUNT SECS       print the input events read from PATH until COUNT
 *                                           key presses/releases came (prints "evdev ready
 *                                           PATH" once open)
 *   isola-probe power-key PATH SECS         wait for a KEY_POWER press on PATH (the ACPI power
 *                                           button's input device), SECS at most (0: for as
 *                                           long as it takes, as acpid would); prints
 *                                           "power-key pressed" and exits 0 when it comes
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/input.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static long arg_num(const char *s)
{
	char *end;
	long v = strtol(s, &end, 0);

	if (*s == '\0' || *end != '\0' || v < 0) {
		fprintf(stderr, "isola-probe: bad number '%s'\n", s);
		exit(2);
	}
	return v;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Milliseconds left until `deadline` (>= 0). */
static int left_ms(double deadline)
{
	double left = deadline - now();

	return left > 0 ? (int)(left * 1000) + 1 : 0;
}

/* xorshift64*, one 64-bit word per 8 bytes, little endian. */
static int pattern(uint64_t seed, long bytes)
{
	uint64_t x = seed * 2 + 1;
	unsigned char buf[4096];
	long done = 0;

	while (done < bytes) {
		size_t n = 0;

		while (n < sizeof(buf) && done + (long)n < bytes) {
			uint64_t w;

			x ^= x >> 12;
			x ^= x << 25;
			x ^= x >> 27;
			w = x * 0x2545F4914F6CDD1DULL;
			for (int i = 0; i < 8 && done + (long)n < bytes; i++, n++)
				buf[n] = (unsigned char)(w >> (8 * i));
		}
		if (fwrite(buf, 1, n, stdout) != n)
			return 1;
		done += (long)n;
	}
	return fflush(stdout) != 0;
}

static int udp_send(const char *ip, long port, long count)
{
	struct sockaddr_in to = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	long sent = 0;

	if (fd < 0 || inet_pton(AF_INET, ip, &to.sin_addr) != 1) {
		fprintf(stderr, "isola-probe: udp-send: %s\n", strerror(errno));
		return 1;
	}
	for (long seq = 0; seq < count; seq++) {
		char msg[64];
		int len = snprintf(msg, sizeof(msg), "isola-udp %ld", seq);

		if (sendto(fd, msg, (size_t)len, 0, (struct sockaddr *)&to, sizeof(to)) == len)
			sent++;
		else
			fprintf(stderr, "isola-probe: udp-send %ld: %s\n", seq, strerror(errno));
	}
	printf("udp-send sent=%ld\n", sent);
	return sent == count ? 0 : 1;
}

static int udp_recv(long port, long count, long secs)
{
	struct sockaddr_in me = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	double deadline = now() + (double)secs;
	unsigned char *seen = calloc((size_t)count + 1, 1);
	long got = 0, distinct = 0, bad = 0;

	if (fd < 0 || !seen || bind(fd, (struct sockaddr *)&me, sizeof(me)) != 0) {
		fprintf(stderr, "isola-probe: udp-recv: %s\n", strerror(errno));
		return 1;
	}
	printf("udp-recv ready\n");
	fflush(stdout);
	while (distinct < count) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		char msg[128];
		long seq;
		ssize_t n;

		if (poll(&p, 1, left_ms(deadline)) <= 0)
			break;
		n = recv(fd, msg, sizeof(msg) - 1, 0);
		if (n <= 0)
			continue;
		msg[n] = '\0';
		got++;
		if (sscanf(msg, "isola-udp %ld", &seq) != 1 || seq < 0 || seq >= count) {
			bad++;
			continue;
		}
		if (!seen[seq]++)
			distinct++;
	}
	printf("udp-recv got=%ld distinct=%ld bad=%ld\n", got, distinct, bad);
	return distinct == count && bad == 0 ? 0 : 1;
}

static int evdev(const char *path, long count, long secs)
{
	int fd = open(path, O_RDONLY | O_NONBLOCK);
	double deadline = now() + (double)secs;
	long got = 0;

	if (fd < 0) {
		fprintf(stderr, "isola-probe: evdev %s: %s\n", path, strerror(errno));
		return 1;
	}
	printf("evdev ready %s\n", path);
	fflush(stdout);
	while (got < count) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		struct input_event ev;

		if (poll(&p, 1, left_ms(deadline)) <= 0)
			break;
		if (read(fd, &ev, sizeof(ev)) != (ssize_t)sizeof(ev))
			continue;
		printf("evdev event type=%u code=%u value=%d\n", ev.type, ev.code, ev.value);
		/* Presses and releases only: a soft autorepeat (value 2) may come in between. */
		if (ev.type == EV_KEY && (ev.value == 0 || ev.value == 1))
			got++;
	}
	printf("evdev keys=%ld\n", got);
	return got == count ? 0 : 1;
}

static int power_key(const char *path, long secs)
{
	int fd = open(path, O_RDONLY | O_NONBLOCK);
	double deadline = now() + (double)secs;

	if (fd < 0) {
		fprintf(stderr, "isola-probe: power-key %s: %s\n", path, strerror(errno));
		return 1;
	}
	for (;;) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		struct input_event ev;

		if (poll(&p, 1, secs ? left_ms(deadline) : -1) <= 0)
			break;
		if (read(fd, &ev, sizeof(ev)) != (ssize_t)sizeof(ev))
			continue;
		if (ev.type == EV_KEY && ev.code == KEY_POWER && ev.value == 1) {
			printf("power-key pressed %s\n", path);
			return 0;
		}
	}
	printf("power-key none within %ld s\n", secs);
	return 1;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 4 && !strcmp(argv[1], "pattern"))
		return pattern((uint64_t)arg_num(argv[2]), arg_num(argv[3]));
	if (argc == 5 && !strcmp(argv[1], "udp-send"))
		return udp_send(argv[2], arg_num(argv[3]), arg_num(argv[4]));
	if (argc == 5 && !strcmp(argv[1], "udp-recv"))
		return udp_recv(arg_num(argv[2]), arg_num(argv[3]), arg_num(argv[4]));
	if (argc == 5 && !strcmp(argv[1], "evdev"))
		return evdev(argv[2], arg_num(argv[3]), arg_num(argv[4]));
	if (argc == 4 && !strcmp(argv[1], "power-key"))
		return power_key(argv[2], arg_num(argv[3]));
	fprintf(stderr, "usage: isola-probe pattern SEED BYTES | udp-send IP PORT COUNT | "
			"udp-recv PORT COUNT SECS | evdev PATH COUNT SECS | power-key PATH SECS\n");
	return 2;
}
