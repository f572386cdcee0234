/*
 * cpu-check: what each vCPU's CPUID says about it and whether a hypercall returns.
 *
 * Every AP the MP table describes is started; each executes CPUID in ring 0 (where a guest
 * kernel executes it) for the leaves below and records the results. The BSP does the same in
 * ring 0 (the SYS_CPUID service) and in ring 3 (natively, on hosts that emulate only ring 0).
 * The first AP then makes a KVM hypercall (KVM_HC_VAPIC_POLL_IRQ, which returns 0) with the
 * vendor's instruction, vmmcall on AMD and vmcall otherwise, as Linux does; the BSP waits for
 * it to return (cmdline `cpu-check.wait_ms`, default 2000; `cpu-check.hypercall=0` skips
 * the hypercall). The output protocol is in
 * ../src/lib.rs.
 */
#include "rt.h"

#define KVM_HC_VAPIC_POLL_IRQ 1
#define EXIT_MISSING_CPUS     4

static const struct {
	uint32_t leaf, subleaf;
} leaves[] = {
	{ 0x0, 0 },         { 0x1, 0 },         { 0xb, 0 },         { 0xb, 1 },
	{ 0x40000000, 0 },  { 0x40000001, 0 },  { 0x80000001, 0 },  { 0x80000008, 0 },
	{ 0x8000001e, 0 },
};
#define NLEAVES (sizeof(leaves) / sizeof(leaves[0]))

static struct cpuid_regs ap_cpuid[MAX_APS][NLEAVES];
static volatile uint32_t ap_apic[MAX_APS];
static volatile uint32_t ap_done;
/* 0: not tried, 1: the hypercall instruction is being executed, 2: it returned. */
static volatile uint32_t hc_state;
/* Cleared by `cpu-check.hypercall=0`: the first AP parks instead of making the hypercall. */
static volatile uint32_t hc_wanted = 1;
static volatile uint64_t hc_ret;

static int vendor_is_amd(const struct cpuid_regs *leaf0)
{
	/* "AuthenticAMD" / "HygonGenuine": EBX holds the first four characters. */
	return leaf0->ebx == 0x68747541u || leaf0->ebx == 0x6f677948u;
}

static uint64_t hypercall(int amd, uint64_t nr)
{
	uint64_t ret;
	if (amd)
		__asm__ volatile("vmmcall" : "=a"(ret) : "a"(nr) : "memory");
	else
		__asm__ volatile("vmcall" : "=a"(ret) : "a"(nr) : "memory");
	return ret;
}

/* Ring 0, on each AP (see shim.S). */
void ap_ring0_hook(uint32_t index, uint32_t apic_id)
{
	if (index >= MAX_APS)
		return;
	for (unsigned i = 0; i < NLEAVES; i++)
		ap_cpuid[index][i] = cpuid_here(leaves[i].leaf, leaves[i].subleaf);
	ap_apic[index] = apic_id;
	mb();
	__atomic_fetch_add(&ap_done, 1, __ATOMIC_SEQ_CST);
	if (index != 0 || !hc_wanted)
		return;
	hc_state = 1;
	mb();
	hc_ret = hypercall(vendor_is_amd(&ap_cpuid[0][0]), KVM_HC_VAPIC_POLL_IRQ);
	mb();
	hc_state = 2;
}

static void print_leaf(uint32_t apic, int ring, unsigned i, const struct cpuid_regs *r)
{
	print("cpuid: cpu=%u ring=%d leaf=0x%08x sub=%u eax=0x%08x ebx=0x%08x ecx=0x%08x edx=0x%08x\n",
	      apic, ring, leaves[i].leaf, leaves[i].subleaf, r->eax, r->ebx, r->ecx, r->edx);
}

void guest_main(void)
{
	static struct mp_info mp;
	static uint8_t targets[MAX_CPUS];
	uint64_t wait_ms = 2000;

	uint64_t hc = 1;
	if (cmdline_u64("cpu-check.wait_ms", &wait_ms) < 0)
		wait_ms = 2000;
	if (cmdline_u64("cpu-check.hypercall", &hc) == 1 && hc == 0)
		hc_wanted = 0;
	mp_find(&mp);
	uint32_t me = lapic_id();
	unsigned n = 0;
	for (unsigned i = 0; i < mp.cpus; i++)
		if (mp.apic_ids[i] != me)
			targets[n++] = mp.apic_ids[i];
	print("cpu-check: cpus=%u bsp=%u\n", mp.cpus, me);
	unsigned started = smp_start_aps(targets, n);
	/* The APs record their CPUID right after reporting in: wait (bounded) for all of them. */
	uint64_t hz = tsc_hz();
	uint64_t t0 = rdtsc();
	while (ap_done < started && rdtsc() - t0 < 2 * hz)
		cpu_relax();

	for (unsigned i = 0; i < NLEAVES; i++) {
		struct cpuid_regs r = cpuid_ring0(leaves[i].leaf, leaves[i].subleaf);
		print_leaf(me, 0, i, &r);
	}
	for (unsigned a = 0; a < ap_done && a < MAX_APS; a++)
		for (unsigned i = 0; i < NLEAVES; i++)
			print_leaf(ap_apic[a], 0, i, &ap_cpuid[a][i]);
	for (unsigned i = 0; i < NLEAVES; i++) {
		struct cpuid_regs r = cpuid_here(leaves[i].leaf, leaves[i].subleaf);
		print_leaf(me, 3, i, &r);
	}
	if (ap_done + 1 < mp.cpus) {
		print("cpu-check: cpus-reporting=%u\n", ap_done + 1);
		debug_exit(EXIT_MISSING_CPUS);
	}

	if (ap_done == 0 || !hc_wanted) {
		serial_puts(ap_done ? "hypercall: not tried (cpu-check.hypercall=0)\n"
				    : "hypercall: not tried (one cpu)\n");
	} else {
		t0 = rdtsc();
		uint64_t limit = wait_ms * (hz / 1000);
		while (hc_state != 2 && rdtsc() - t0 < limit)
			cpu_relax();
		if (hc_state == 2)
			print("hypercall: returned rax=0x%lx\n", hc_ret);
		else
			print("hypercall: no return in %lu ms (state=%u)\n", wait_ms, hc_state);
	}
	serial_puts("cpu-check: ok\n");
	poweroff();
}
