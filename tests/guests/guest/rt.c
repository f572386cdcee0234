/* Ring-3 runtime for the Isola test guests (see rt.h). */
#include "rt.h"

/* ---- Memory ---- */

uint8_t peek8(uint64_t addr)
{
	return *(const volatile uint8_t *)addr;
}

uint16_t peek16(uint64_t addr)
{
	return *(const volatile uint16_t *)addr;
}

uint32_t peek32(uint64_t addr)
{
	return *(const volatile uint32_t *)addr;
}

uint64_t peek64(uint64_t addr)
{
	return *(const volatile uint64_t *)addr;
}

/* rep movsb/stosb rather than C loops, which the compiler could turn back into calls. */
void *memcpy(void *dst, const void *src, size_t n)
{
	void *d = dst;
	__asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
	return dst;
}

void *memset(void *dst, int c, size_t n)
{
	void *d = dst;
	__asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return dst;
}

/* ---- Serial ---- */

void serial_putc(char c)
{
	/* The VMM's UART is always ready, so LSR is not polled (fewer exits). */
	outb(COM1, (uint8_t)c);
}

void serial_puts(const char *s)
{
	while (*s)
		serial_putc(*s++);
}

void serial_write(const volatile uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		serial_putc((char)p[i]);
}

static void put_padding(char pad, int n)
{
	while (n-- > 0)
		serial_putc(pad);
}

static void put_number(uint64_t v, unsigned base, int negative, int width, char pad)
{
	char buf[24];
	int len = 0;

	do {
		buf[len++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	if (negative) {
		if (pad == '0') {
			serial_putc('-');
			width--;
		} else {
			buf[len++] = '-';
		}
	}
	put_padding(pad, width - len);
	while (len)
		serial_putc(buf[--len]);
}

void vprint(const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			serial_putc(*fmt);
			continue;
		}
		fmt++;
		char pad = ' ';
		int width = 0, is_long = 0;
		if (*fmt == '0') {
			pad = '0';
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l') {
			is_long = 1;
			fmt++;
		}
		switch (*fmt) {
		case 'c':
			serial_putc((char)va_arg(ap, int));
			break;
		case 's': {
			const char *s = va_arg(ap, const char *);
			int len = 0;
			while (s[len])
				len++;
			put_padding(' ', width - len);
			serial_puts(s);
			break;
		}
		case 'd': {
			int64_t v = is_long ? va_arg(ap, long) : va_arg(ap, int);
			put_number(v < 0 ? -(uint64_t)v : (uint64_t)v, 10, v < 0, width, pad);
			break;
		}
		case 'u':
		case 'x': {
			uint64_t v = is_long ? va_arg(ap, unsigned long) : va_arg(ap, unsigned);
			put_number(v, *fmt == 'u' ? 10 : 16, 0, width, pad);
			break;
		}
		case '%':
			serial_putc('%');
			break;
		case '\0':
			return;
		default:
			serial_putc('%');
			serial_putc(*fmt);
			break;
		}
	}
}

void print(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vprint(fmt, ap);
	va_end(ap);
}

/* ---- CRC-32 ---- */

static uint32_t crc_table[256];
static int crc_table_ready;

uint32_t crc32(const volatile uint8_t *p, uint64_t n)
{
	if (!crc_table_ready) {
		for (uint32_t i = 0; i < 256; i++) {
			uint32_t c = i;
			for (int k = 0; k < 8; k++)
				c = (c & 1) ? (c >> 1) ^ 0xedb88320u : c >> 1;
			crc_table[i] = c;
		}
		crc_table_ready = 1;
	}
	uint32_t crc = 0xffffffffu;
	for (uint64_t i = 0; i < n; i++)
		crc = crc_table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
	return crc ^ 0xffffffffu;
}

/* ---- Services and exits ---- */

void sys_wait_irq(uint32_t seen)
{
	__asm__ volatile("hlt" : : "a"(SYS_WAIT_IRQ), "D"(seen) : "memory");
}

void sys_stop(void)
{
	for (;;)
		__asm__ volatile("hlt" : : "a"(SYS_STOP) : "memory");
}

void sys_triple_fault(void)
{
	for (;;)
		__asm__ volatile("hlt" : : "a"(SYS_TRIPLE_FAULT) : "memory");
}

void debug_exit(uint8_t v)
{
	outb(PORT_DEBUG_EXIT, v);
	sys_stop();
}

void poweroff(void)
{
	outb(PORT_ACPI_SLEEP, ACPI_SLEEP_S5);
	/* Still running (e.g. QEMU, which has no such register): debug-exit 0. */
	debug_exit(0);
}

void reset(void)
{
	outb(PORT_I8042, 0xfe);
	sys_stop();
}

/* ---- LAPIC ---- */

uint32_t lapic_id(void)
{
	return mmio_read32(LAPIC_ID) >> 24;
}

void lapic_enable(void)
{
	/* Mask both 8259 PICs, as Linux does: firmware (e.g. SeaBIOS under QEMU) may have left
	 * them routing the PIT to vector 8, which would look like #DF. */
	outb(PIC1_DATA, 0xff);
	outb(PIC2_DATA, 0xff);
	mmio_write32(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR);
}

/* ---- MP table ---- */

#define MPF_SIGNATURE 0x5f504d5fu  /* "_MP_" */
#define MPC_SIGNATURE 0x504d4350u  /* "PCMP" */

static int checksum_ok(uint64_t addr, uint64_t len)
{
	uint8_t sum = 0;
	for (uint64_t i = 0; i < len; i++)
		sum += peek8(addr + i);
	return sum == 0;
}

/* As Linux's smp_scan_config: 16-byte steps, signature, length 1, revision 1 or 4, checksum. */
static uint64_t mp_scan(uint64_t base, uint64_t len)
{
	for (uint64_t a = base; a + 16 <= base + len; a += 16) {
		if (peek32(a) == MPF_SIGNATURE && peek8(a + 8) == 1 &&
		    (peek8(a + 9) == 1 || peek8(a + 9) == 4) && checksum_ok(a, 16))
			return a;
	}
	return 0;
}

/*
 * Search order (the first valid floating pointer wins): the first KiB of the EBDA (segment
 * at 0x40e) if set; the last KiB of base memory per the BDA (KiB count at 0x413); Linux's
 * fixed 639 KiB and 0-1 KiB windows; the BIOS area 0xf0000-0xfffff.
 */
static uint64_t mp_search(void)
{
	uint64_t a = 0;
	uint64_t ebda = (uint64_t)peek16(0x40e) << 4;
	uint64_t base_kb = peek16(0x413);

	if (ebda)
		a = mp_scan(ebda, 1024);
	if (!a && base_kb >= 1 && base_kb <= 640)
		a = mp_scan((base_kb - 1) * 1024, 1024);
	if (!a)
		a = mp_scan(639 * 1024, 1024);
	if (!a)
		a = mp_scan(0, 1024);
	if (!a)
		a = mp_scan(0xf0000, 0x10000);
	return a;
}

void mp_find(struct mp_info *info)
{
	info->cpus = 0;
	info->mpf_addr = mp_search();
	if (!info->mpf_addr)
		return;

	uint64_t mpc = peek32(info->mpf_addr + 4);
	if (!mpc) {
		/* No table: an MP-spec default configuration (feature byte 1) has two CPUs. */
		if (peek8(info->mpf_addr + 11)) {
			info->apic_ids[0] = 0;
			info->apic_ids[1] = 1;
			info->cpus = 2;
		}
		return;
	}
	/* As Linux's smp_check_mpc. */
	uint64_t len = peek16(mpc + 4);
	uint8_t rev = peek8(mpc + 6);
	if (peek32(mpc) != MPC_SIGNATURE || len < 44 || !checksum_ok(mpc, len) ||
	    (rev != 1 && rev != 4) || peek32(mpc + 36) == 0)
		return;
	/* As Linux's smp_read_mpc: walk entries up to the table length. */
	for (uint64_t off = 44; off < len;) {
		uint8_t type = peek8(mpc + off);
		if (type == 0) {
			if (off + 20 > len)
				break;
			if ((peek8(mpc + off + 3) & 1) && info->cpus < MAX_CPUS)
				info->apic_ids[info->cpus++] = peek8(mpc + off + 1);
			off += 20;
		} else if (type >= 1 && type <= 4) {
			off += 8;
		} else {
			break;
		}
	}
}

/* ---- SMP bring-up ---- */

#define ICR_BUSY          (1u << 12)
#define ICR_INIT          0x4500u   /* INIT, level assert */
#define ICR_STARTUP       0x4600u   /* STARTUP | vector */
#define INIT_DELAY_CYCLES 100000ull
#define SIPI_DELAY_CYCLES 50000ull
#define AP_WAIT_CYCLES    5000000000ull  /* ~2 s at 2.5 GHz */

static void delay_cycles(uint64_t cycles)
{
	uint64_t start = rdtsc();
	while (rdtsc() - start < cycles)
		cpu_relax();
}

static void send_ipi(uint8_t apic_id, uint32_t icr_lo)
{
	mmio_write32(LAPIC_ICR_HI, (uint32_t)apic_id << 24);
	mmio_write32(LAPIC_ICR_LO, icr_lo);
	for (int i = 0; i < 100000 && (mmio_read32(LAPIC_ICR_LO) & ICR_BUSY); i++)
		cpu_relax();
}

unsigned smp_start_aps(const uint8_t *apic_ids, unsigned n)
{
	if (n > MAX_APS)
		n = MAX_APS;
	if (n == 0)
		return 0;
	memcpy((void *)(uint64_t)AP_TRAMPOLINE, ap_trampoline_start,
	       (size_t)(ap_trampoline_end - ap_trampoline_start));
	lapic_enable();
	for (unsigned i = 0; i < n; i++) {
		send_ipi(apic_ids[i], ICR_INIT);
		delay_cycles(INIT_DELAY_CYCLES);
		send_ipi(apic_ids[i], ICR_STARTUP | AP_SIPI_VECTOR);
		delay_cycles(SIPI_DELAY_CYCLES);
		send_ipi(apic_ids[i], ICR_STARTUP | AP_SIPI_VECTOR);
		delay_cycles(SIPI_DELAY_CYCLES);
	}
	uint64_t start = rdtsc();
	while (ap_started < n && rdtsc() - start < AP_WAIT_CYCLES)
		cpu_relax();
	return ap_started;
}

/* ---- LAPIC timer and TSC ---- */

#define LVT_MASKED        (1u << 16)
#define LVT_PERIODIC      (1u << 17)
#define TIMER_DIVIDE_1    0xb
#define TIMER_DIVIDE_16   0x3
#define APIC_BUS_HZ       1000000000ull  /* KVM's emulated APIC bus */
#define TSC_HZ_FALLBACK   2500000000ull  /* if the timer does not count */

void lapic_timer_periodic(uint8_t vector, uint32_t count)
{
	mmio_write32(LAPIC_TIMER_INIT, 0);
	if (!count) {
		mmio_write32(LAPIC_LVT_TIMER, LVT_MASKED);
		return;
	}
	mmio_write32(LAPIC_TIMER_DIVIDE, TIMER_DIVIDE_16);
	mmio_write32(LAPIC_LVT_TIMER, LVT_PERIODIC | vector);
	mmio_write32(LAPIC_TIMER_INIT, count);
}

uint64_t tsc_hz(void)
{
	static uint64_t hz;
	if (hz)
		return hz;
	/* Masked one-shot from 0xffffffff at divide 1: 1 count per ns. Time 20 ms of counts. */
	const uint32_t span = 20000000;
	mmio_write32(LAPIC_TIMER_INIT, 0);
	mmio_write32(LAPIC_LVT_TIMER, LVT_MASKED);
	mmio_write32(LAPIC_TIMER_DIVIDE, TIMER_DIVIDE_1);
	mmio_write32(LAPIC_TIMER_INIT, 0xffffffffu);
	uint32_t c0 = mmio_read32(LAPIC_TIMER_CURRENT);
	uint64_t t0 = rdtsc(), t1 = t0;
	uint32_t c1 = c0;
	/* Bounded: give up after about 4e9 TSC cycles (over a second at any plausible rate). */
	while (c0 - c1 < span && t1 - t0 < 4000000000ull) {
		c1 = mmio_read32(LAPIC_TIMER_CURRENT);
		t1 = rdtsc();
	}
	mmio_write32(LAPIC_TIMER_INIT, 0);
	if (c0 - c1 < span / 2)
		hz = TSC_HZ_FALLBACK;
	else
		hz = (t1 - t0) * APIC_BUS_HZ / (c0 - c1);
	return hz;
}

/* ---- Boot information ---- */

#define PVH_MAGIC        0x336ec578u
#define HDRS_MAGIC       0x53726448u   /* "HdrS" */
#define BELOW_4G(a, len) ((a) < 0x100000000ull && (len) <= 0x100000000ull - (a))

uint64_t boot_cmdline(void)
{
	uint64_t b = boot_info_ptr, cmdline = 0;
	if (boot_protocol == BOOT_PROTO_PVH) {
		if (BELOW_4G(b, 0x38) && peek32(b) == PVH_MAGIC)
			cmdline = peek64(b + 0x18);
	} else if (BELOW_4G(b, 0x1000) && peek32(b + 0x202) == HDRS_MAGIC) {
		uint64_t ext = peek8(b + 0x1ef) == 0 ? peek32(b + 0x0c8) : 0;
		cmdline = peek32(b + 0x228) | ext << 32;
	}
	return BELOW_4G(cmdline, 2048) ? cmdline : 0;
}

uint64_t boot_ram_end(void)
{
	uint64_t b = boot_info_ptr, map = 0, end = 0;
	unsigned entries = 0, stride = 0;
	if (boot_protocol == BOOT_PROTO_PVH) {
		if (BELOW_4G(b, 0x38) && peek32(b) == PVH_MAGIC && peek32(b + 4) >= 1) {
			map = peek64(b + 0x28);
			entries = peek32(b + 0x30);
			stride = 24;
		}
	} else if (BELOW_4G(b, 0x1000) && peek32(b + 0x202) == HDRS_MAGIC) {
		map = b + 0x2d0;
		entries = peek8(b + 0x1e8);
		stride = 20;
	}
	if (entries > 128)
		entries = 128;
	if (!BELOW_4G(map, (uint64_t)entries * stride))
		return 0;
	for (unsigned i = 0; i < entries; i++) {
		uint64_t e = map + (uint64_t)i * stride;
		if (peek32(e + 16) == 1 && peek64(e) + peek64(e + 8) > end)
			end = peek64(e) + peek64(e + 8);
	}
	return end;
}

int str_eq(const char *a, const char *b)
{
	while (*a && *a == *b) {
		a++;
		b++;
	}
	return *a == *b;
}

int cmdline_get(const char *key, char *out, size_t size)
{
	uint64_t c = boot_cmdline();
	if (!c)
		return 0;
	uint64_t i = 0;
	while (i < 2047 && peek8(c + i)) {
		while (peek8(c + i) == ' ')
			i++;
		uint64_t j = 0;
		while (key[j] && i + j < 2047 && peek8(c + i + j) == (uint8_t)key[j])
			j++;
		if (!key[j] && i + j < 2047 && peek8(c + i + j) == '=') {
			uint64_t v = i + j + 1;
			size_t n = 0;
			while (v < 2047 && peek8(c + v) && peek8(c + v) != ' ') {
				if (n + 1 < size)
					out[n++] = (char)peek8(c + v);
				v++;
			}
			if (size)
				out[n] = 0;
			return 1;
		}
		while (i < 2047 && peek8(c + i) && peek8(c + i) != ' ')
			i++;
	}
	return 0;
}

int cmdline_u64(const char *key, uint64_t *out)
{
	char buf[24];
	if (!cmdline_get(key, buf, sizeof(buf)))
		return 0;
	const char *p = buf;
	unsigned base = 10;
	if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
		base = 16;
		p += 2;
	}
	if (!*p)
		return -1;
	uint64_t v = 0;
	for (; *p; p++) {
		unsigned d;
		if (*p >= '0' && *p <= '9')
			d = (unsigned)(*p - '0');
		else if (base == 16 && *p >= 'a' && *p <= 'f')
			d = (unsigned)(*p - 'a' + 10);
		else if (base == 16 && *p >= 'A' && *p <= 'F')
			d = (unsigned)(*p - 'A' + 10);
		else
			return -1;
		if (v > (~0ull - d) / base)
			return -1;
		v = v * base + d;
	}
	*out = v;
	return 1;
}

/* ---- PCI configuration space ---- */

static void pci_select(uint32_t bdf, unsigned offset)
{
	outl(PCI_CONF1_ADDRESS, 0x80000000u | bdf << 8 | (offset & 0xfc));
}

uint32_t pci_read32(uint32_t bdf, unsigned offset)
{
	pci_select(bdf, offset);
	return inl(PCI_CONF1_DATA);
}

uint16_t pci_read16(uint32_t bdf, unsigned offset)
{
	pci_select(bdf, offset);
	return inw(PCI_CONF1_DATA + (offset & 2));
}

uint8_t pci_read8(uint32_t bdf, unsigned offset)
{
	pci_select(bdf, offset);
	return inb(PCI_CONF1_DATA + (offset & 3));
}

void pci_write32(uint32_t bdf, unsigned offset, uint32_t v)
{
	pci_select(bdf, offset);
	outl(PCI_CONF1_DATA, v);
}

void pci_write16(uint32_t bdf, unsigned offset, uint16_t v)
{
	pci_select(bdf, offset);
	outw(PCI_CONF1_DATA + (offset & 2), v);
}

void pci_write8(uint32_t bdf, unsigned offset, uint8_t v)
{
	pci_select(bdf, offset);
	outb(PCI_CONF1_DATA + (offset & 3), v);
}

uint64_t pci_bar_addr(uint32_t bdf, unsigned index)
{
	uint32_t lo = pci_read32(bdf, PCI_BAR0 + 4 * index);
	if (lo & 1)
		return 0;                       /* I/O space */
	uint64_t addr = lo & ~0xfu;
	if (((lo >> 1) & 3) == 2 && index < 5) /* 64-bit */
		addr |= (uint64_t)pci_read32(bdf, PCI_BAR0 + 4 * (index + 1)) << 32;
	return addr;
}
