/*
 * triple-fault: announces itself, then loads an IDT with limit 0 and raises #GP (a load from a
 * non-canonical address) in ring 0, so the CPU triple-faults: the VM must shut down.
 */
#include "rt.h"

void guest_main(void)
{
	serial_puts("triple-fault: faulting now\n");
	sys_triple_fault();
}
