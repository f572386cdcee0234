/*
 * boot-check: reads the boot information the way Linux does for the entry it came in by
 * (PVH hvm_start_info, or the Linux boot_params "zero page"), prints it, starts every
 * application processor the MP table describes and reports which came up, then powers off.
 * The output protocol is documented in ../src/lib.rs.
 */
#include "rt.h"

#define PVH_MAGIC        0x336ec578u
#define HDRS_MAGIC       0x53726448u   /* "HdrS" */
#define E820_MAX         128           /* E820_MAX_ENTRIES_ZEROPAGE */
#define CMDLINE_MAX      2047          /* COMMAND_LINE_SIZE - 1 */
#define MAPPED_LIMIT     0x100000000ull

#define EXIT_BAD_BOOT_INFO  3
#define EXIT_MISSING_CPUS   4
#define EXIT_UNMAPPED       5

struct boot_info {
	uint64_t cmdline;
	uint64_t e820;
	unsigned e820_entries;
	unsigned e820_stride;
	uint64_t initrd_addr;
	uint64_t initrd_size;
};

static int mapped(uint64_t addr, uint64_t len)
{
	return addr < MAPPED_LIMIT && len <= MAPPED_LIMIT - addr;
}

/* Xen/Linux PVH: struct hvm_start_info at %ebx. */
static int read_pvh(uint64_t si, struct boot_info *b)
{
	if (!mapped(si, 0x38) || peek32(si) != PVH_MAGIC)
		return 0;
	uint32_t version = peek32(si + 0x04);
	uint32_t nr_modules = peek32(si + 0x0c);
	uint64_t modlist = peek64(si + 0x10);
	b->cmdline = peek64(si + 0x18);
	b->e820_stride = 24; /* hvm_memmap_table_entry */
	if (version >= 1) {
		b->e820 = peek64(si + 0x28);
		b->e820_entries = peek32(si + 0x30);
	}
	/* Linux takes module 0 as the initrd. */
	if (nr_modules && modlist && mapped(modlist, 32)) {
		b->initrd_addr = peek64(modlist);
		b->initrd_size = peek64(modlist + 8);
	}
	return 1;
}

/* Linux 64-bit boot protocol: struct boot_params at %rsi. */
static int read_linux64(uint64_t bp, struct boot_info *b)
{
	if (!mapped(bp, 0x1000) || peek32(bp + 0x202) != HDRS_MAGIC)
		return 0;
	/* sanitize_boot_params(): a nonzero sentinel means the ext_* fields are stale. */
	int ext = peek8(bp + 0x1ef) == 0;
	uint64_t ext_ramdisk_image = ext ? peek32(bp + 0x0c0) : 0;
	uint64_t ext_ramdisk_size = ext ? peek32(bp + 0x0c4) : 0;
	uint64_t ext_cmd_line_ptr = ext ? peek32(bp + 0x0c8) : 0;

	b->cmdline = peek32(bp + 0x228) | ext_cmd_line_ptr << 32;
	b->e820 = bp + 0x2d0;
	b->e820_entries = peek8(bp + 0x1e8);
	b->e820_stride = 20; /* struct boot_e820_entry */
	/* early_reserve_initrd(): no initrd unless type_of_loader, image and size are set. */
	if (peek8(bp + 0x210)) {
		b->initrd_addr = peek32(bp + 0x218) | ext_ramdisk_image << 32;
		b->initrd_size = peek32(bp + 0x21c) | ext_ramdisk_size << 32;
	}
	return 1;
}

static __attribute__((noreturn)) void fail(const char *what, uint8_t code)
{
	print("boot-check: %s\n", what);
	debug_exit(code);
}

/* Whether the command line holds `word` as a whole space-separated token. */
static int cmdline_has(uint64_t cmdline, const char *word)
{
	uint64_t i = 0;
	while (i < CMDLINE_MAX && peek8(cmdline + i)) {
		while (peek8(cmdline + i) == ' ')
			i++;
		uint64_t j = 0;
		while (word[j] && i + j < CMDLINE_MAX && peek8(cmdline + i + j) == (uint8_t)word[j])
			j++;
		uint8_t end = i + j < CMDLINE_MAX ? peek8(cmdline + i + j) : 0;
		if (!word[j] && (end == ' ' || end == 0))
			return 1;
		while (i < CMDLINE_MAX && peek8(cmdline + i) && peek8(cmdline + i) != ' ')
			i++;
	}
	return 0;
}

void guest_main(void)
{
	struct boot_info b = { 0 };
	int ok;

	if (boot_protocol == BOOT_PROTO_PVH) {
		serial_puts("boot-check: protocol=pvh\n");
		ok = read_pvh(boot_info_ptr, &b);
	} else {
		serial_puts("boot-check: protocol=linux64\n");
		ok = read_linux64(boot_info_ptr, &b);
	}
	if (!ok)
		fail("bad boot info", EXIT_BAD_BOOT_INFO);

	/* Command line, up to its NUL (at most COMMAND_LINE_SIZE - 1 bytes, as Linux). */
	serial_puts("cmdline: ");
	if (b.cmdline && mapped(b.cmdline, CMDLINE_MAX)) {
		for (uint64_t i = 0; i < CMDLINE_MAX; i++) {
			uint8_t c = peek8(b.cmdline + i);
			if (!c)
				break;
			serial_putc((char)c);
		}
	}
	serial_putc('\n');

	/* Memory map, in table order. */
	if (b.e820_entries > E820_MAX)
		b.e820_entries = E820_MAX;
	if (b.e820_entries && !mapped(b.e820, (uint64_t)b.e820_entries * b.e820_stride))
		fail("memory map not below 4 GiB", EXIT_UNMAPPED);
	print("e820: entries=%u\n", b.e820_entries);
	for (unsigned i = 0; i < b.e820_entries; i++) {
		uint64_t e = b.e820 + (uint64_t)i * b.e820_stride;
		print("e820: 0x%016lx 0x%016lx %u\n", peek64(e), peek64(e + 8), peek32(e + 16));
	}

	/* Initrd. */
	if (b.initrd_addr && b.initrd_size) {
		if (!mapped(b.initrd_addr, b.initrd_size))
			fail("initrd not below 4 GiB", EXIT_UNMAPPED);
		print("initrd: addr=0x%lx size=%lu crc32=0x%08x\n", b.initrd_addr, b.initrd_size,
		      crc32(phys(b.initrd_addr), b.initrd_size));
	} else {
		serial_puts("initrd: none\n");
	}

	/* CPUs: the MP table's enabled processors; start all but ourselves. */
	static struct mp_info mp;
	static uint8_t targets[MAX_CPUS];
	static uint32_t started_ids[MAX_APS];
	mp_find(&mp);
	print("cpus-described: %u\n", mp.cpus);

	uint32_t me = lapic_id();
	unsigned n = 0;
	for (unsigned i = 0; i < mp.cpus; i++)
		if (mp.apic_ids[i] != me)
			targets[n++] = mp.apic_ids[i];
	unsigned started = smp_start_aps(targets, n);
	if (started > MAX_APS)
		started = MAX_APS;
	for (unsigned i = 0; i < started; i++) {
		uint32_t id = ap_apic_ids[i];
		unsigned j = i;
		for (; j > 0 && started_ids[j - 1] > id; j--)
			started_ids[j] = started_ids[j - 1];
		started_ids[j] = id;
	}
	for (unsigned i = 0; i < started; i++)
		print("cpu-started: apic-id=%u\n", started_ids[i]);
	print("cpus-started: %u\n", started + 1);
	if (started + 1 < mp.cpus)
		fail("missing cpus", EXIT_MISSING_CPUS);

	serial_puts("boot-check: ok\n");
	if (b.cmdline && mapped(b.cmdline, CMDLINE_MAX) && cmdline_has(b.cmdline, "boot-check.end=reset")) {
		serial_puts("boot-check: resetting\n");
		reset();
	}
	poweroff();
}
