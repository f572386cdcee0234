//! CPUID for each vCPU: what KVM supports, with per-vCPU APIC ids and topology, and with the
//! features the user asked to hide (`--cpu-features -cx16,-xsave`).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// A CPUID output register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// One hideable feature bit: name as Linux's /proc/cpuinfo spells it, leaf, subleaf, register, bit.
struct Feature {
    name: &'static str,
    leaf: u32,
    subleaf: u32,
    reg: Reg,
    bit: u8,
}

const fn f(name: &'static str, leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> Feature {
    Feature {
        name,
        leaf,
        subleaf,
        reg,
        bit,
    }
}

#[rustfmt::skip]
const FEATURES: &[Feature] = &[
    // Leaf 1, EDX
    f("fpu", 1, 0, Reg::Edx, 0), f("tsc", 1, 0, Reg::Edx, 4), f("msr", 1, 0, Reg::Edx, 5),
    f("pae", 1, 0, Reg::Edx, 6), f("mce", 1, 0, Reg::Edx, 7), f("cx8", 1, 0, Reg::Edx, 8),
    f("sep", 1, 0, Reg::Edx, 11), f("mtrr", 1, 0, Reg::Edx, 12), f("pge", 1, 0, Reg::Edx, 13),
    f("cmov", 1, 0, Reg::Edx, 15), f("pat", 1, 0, Reg::Edx, 16), f("pse36", 1, 0, Reg::Edx, 17),
    f("clflush", 1, 0, Reg::Edx, 19), f("mmx", 1, 0, Reg::Edx, 23), f("fxsr", 1, 0, Reg::Edx, 24),
    f("sse", 1, 0, Reg::Edx, 25), f("sse2", 1, 0, Reg::Edx, 26), f("ht", 1, 0, Reg::Edx, 28),
    // Leaf 1, ECX
    f("pni", 1, 0, Reg::Ecx, 0), f("pclmulqdq", 1, 0, Reg::Ecx, 1), f("monitor", 1, 0, Reg::Ecx, 3),
    f("vmx", 1, 0, Reg::Ecx, 5), f("ssse3", 1, 0, Reg::Ecx, 9), f("fma", 1, 0, Reg::Ecx, 12),
    f("cx16", 1, 0, Reg::Ecx, 13), f("pcid", 1, 0, Reg::Ecx, 17), f("sse4_1", 1, 0, Reg::Ecx, 19),
    f("sse4_2", 1, 0, Reg::Ecx, 20), f("x2apic", 1, 0, Reg::Ecx, 21), f("movbe", 1, 0, Reg::Ecx, 22),
    f("popcnt", 1, 0, Reg::Ecx, 23), f("tsc_deadline_timer", 1, 0, Reg::Ecx, 24),
    f("aes", 1, 0, Reg::Ecx, 25), f("xsave", 1, 0, Reg::Ecx, 26), f("avx", 1, 0, Reg::Ecx, 28),
    f("f16c", 1, 0, Reg::Ecx, 29), f("rdrand", 1, 0, Reg::Ecx, 30),
    // Leaf 7.0, EBX / ECX
    f("fsgsbase", 7, 0, Reg::Ebx, 0), f("bmi1", 7, 0, Reg::Ebx, 3), f("hle", 7, 0, Reg::Ebx, 4),
    f("avx2", 7, 0, Reg::Ebx, 5), f("smep", 7, 0, Reg::Ebx, 7), f("bmi2", 7, 0, Reg::Ebx, 8),
    f("erms", 7, 0, Reg::Ebx, 9), f("invpcid", 7, 0, Reg::Ebx, 10), f("rtm", 7, 0, Reg::Ebx, 11),
    f("avx512f", 7, 0, Reg::Ebx, 16), f("rdseed", 7, 0, Reg::Ebx, 18), f("adx", 7, 0, Reg::Ebx, 19),
    f("smap", 7, 0, Reg::Ebx, 20), f("clflushopt", 7, 0, Reg::Ebx, 23), f("clwb", 7, 0, Reg::Ebx, 24),
    f("sha_ni", 7, 0, Reg::Ebx, 29), f("umip", 7, 0, Reg::Ecx, 2), f("pku", 7, 0, Reg::Ecx, 3),
    f("la57", 7, 0, Reg::Ecx, 16), f("rdpid", 7, 0, Reg::Ecx, 22),
    // Leaf 0xd.1, EAX
    f("xsaveopt", 0xd, 1, Reg::Eax, 0), f("xsavec", 0xd, 1, Reg::Eax, 1),
    f("xgetbv1", 0xd, 1, Reg::Eax, 2), f("xsaves", 0xd, 1, Reg::Eax, 3),
    // Leaf 0x8000_0001, ECX / EDX
    f("lahf_lm", 0x8000_0001, 0, Reg::Ecx, 0), f("svm", 0x8000_0001, 0, Reg::Ecx, 2),
    f("abm", 0x8000_0001, 0, Reg::Ecx, 5), f("sse4a", 0x8000_0001, 0, Reg::Ecx, 6),
    f("syscall", 0x8000_0001, 0, Reg::Edx, 11), f("nx", 0x8000_0001, 0, Reg::Edx, 20),
    f("pdpe1gb", 0x8000_0001, 0, Reg::Edx, 26), f("rdtscp", 0x8000_0001, 0, Reg::Edx, 27),
];

/// Leaves whose subleaf index matters (KVM marks them SIGNIFCANT_INDEX).
const KVM_CPUID_FLAG_SIGNIFCANT_INDEX: u32 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuFeatureError {
    #[error("unknown CPU feature '{0}' in --cpu-features (known: {known})", known = known_names())]
    Unknown(String),
    #[error("--cpu-features entry '{0}' must start with '-': features can only be hidden")]
    NotHidden(String),
}

fn known_names() -> String {
    FEATURES
        .iter()
        .map(|f| f.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A validated set of features to hide, parsed from `-a,-b,...`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HiddenFeatures(Vec<&'static str>);

impl std::str::FromStr for HiddenFeatures {
    type Err = CpuFeatureError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut hidden = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let name = item
                .strip_prefix('-')
                .ok_or_else(|| CpuFeatureError::NotHidden(item.to_owned()))?;
            let feature = FEATURES
                .iter()
                .find(|f| f.name.eq_ignore_ascii_case(name))
                .ok_or_else(|| CpuFeatureError::Unknown(name.to_owned()))?;
            hidden.push(feature.name);
        }
        Ok(HiddenFeatures(hidden))
    }
}

fn reg_mut(entry: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut entry.eax,
        Reg::Ebx => &mut entry.ebx,
        Reg::Ecx => &mut entry.ecx,
        Reg::Edx => &mut entry.edx,
    }
}

fn matches(entry: &kvm_cpuid_entry2, leaf: u32, subleaf: u32) -> bool {
    entry.function == leaf
        && (entry.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || entry.index == subleaf)
}

/// Number of bits needed to hold ids 0..n-1.
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// KVM's paravirtual feature leaf and the features in it that a guest uses by hypercall:
/// PV_UNHALT (KVM_HC_KICK_CPU), PV_SEND_IPI (KVM_HC_SEND_IPI), PV_SCHED_YIELD
/// (KVM_HC_SCHED_YIELD). All three act on other vCPUs.
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
const KVM_HYPERCALL_FEATURES: u32 = (1 << 7) | (1 << 11) | (1 << 13);

/// Whether the guest may be offered the KVM features that work by hypercall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hypercalls {
    /// A hypercall made in guest ring 0 returns on this host: offer what KVM supports.
    Offer,
    /// Hide them: the host never completes a hypercall (see `cpu::hypercall`), or the VM has
    /// one vCPU, for which they have no use.
    Hide,
}

/// Adds the subleaves `0..=2` of `leaf` that KVM's list lacks (zeroed, subleaf-indexed), so
/// the topology levels written below exist whatever the host CPU enumerates: an AMD host's
/// list may have leaf 0xb with subleaf 0 only, and a guest that finds no core level takes
/// every APIC id for a package of its own (as Firecracker, which inserts 0xb.1 likewise).
fn ensure_subleaves(cpuid: &mut CpuId, leaf: u32) {
    for subleaf in 0..=2 {
        let present = cpuid
            .as_slice()
            .iter()
            .any(|e| e.function == leaf && e.index == subleaf);
        if !present {
            let entry = kvm_cpuid_entry2 {
                function: leaf,
                index: subleaf,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            };
            if cpuid.push(entry).is_err() {
                log::warn!("CPUID list full: leaf {leaf:#x} subleaf {subleaf} not added");
            }
        }
    }
}

/// The highest basic leaf the list enumerates (leaf 0's EAX), 0 if it has none.
fn max_basic_leaf(cpuid: &CpuId) -> u32 {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax)
}

/// CPUID for vCPU `index` of `num_cpus`: one socket, `num_cpus` cores, one thread per core,
/// APIC id = `index`; the hypercall-based KVM features as `hypercalls` says.
pub fn for_vcpu(
    supported: &CpuId,
    index: u32,
    num_cpus: u32,
    hidden: &HiddenFeatures,
    hypercalls: Hypercalls,
) -> CpuId {
    let mut cpuid = supported.clone();
    if max_basic_leaf(&cpuid) >= 0xb {
        ensure_subleaves(&mut cpuid, 0xb);
    }
    // Leaf 0x1f (V2 extended topology) is only described if KVM enumerates it.
    if max_basic_leaf(&cpuid) >= 0x1f && cpuid.as_slice().iter().any(|e| e.function == 0x1f) {
        ensure_subleaves(&mut cpuid, 0x1f);
    }
    let core_bits = id_bits(num_cpus);
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (index << 24) | (num_cpus.min(255) << 16);
                if num_cpus > 1 {
                    entry.edx |= 1 << 28; // HTT: the package holds more than one logical CPU
                } else {
                    entry.edx &= !(1 << 28);
                }
                entry.ecx |= 1 << 31; // running under a hypervisor
            }
            4 => {
                // Intel deterministic cache parameters: cores per package - 1 in EAX[31:26].
                entry.eax = (entry.eax & 0x03ff_ffff) | ((num_cpus - 1).min(63) << 26);
                // Each cache is shared by one thread (EAX[25:14] = threads sharing - 1).
                entry.eax &= !(0xfff << 14);
            }
            0xb | 0x1f => {
                entry.edx = index;
                match entry.index {
                    0 => {
                        entry.eax = 0; // no SMT: the next level starts at bit 0
                        entry.ebx = 1;
                        entry.ecx = 1 << 8; // level 0, type SMT
                    }
                    1 => {
                        entry.eax = core_bits;
                        entry.ebx = num_cpus;
                        entry.ecx = 1 | (2 << 8); // level 1, type core
                    }
                    level => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = level & 0xff; // type 0: no such level
                    }
                }
            }
            0x8000_0008 => {
                // AMD: cores per package - 1 and APIC id bits used for the core.
                entry.ecx = (entry.ecx & !0xf0ff) | (num_cpus - 1).min(255) | (core_bits << 12);
            }
            KVM_CPUID_FEATURES if hypercalls == Hypercalls::Hide => {
                entry.eax &= !KVM_HYPERCALL_FEATURES;
            }
            0x8000_001e => {
                entry.eax = index; // extended APIC id
                entry.ebx = index & 0xff; // compute unit id, one thread per unit
                entry.ecx = 0; // node 0
            }
            _ => {}
        }
    }
    for name in &hidden.0 {
        let feature = FEATURES
            .iter()
            .find(|f| f.name == *name)
            .expect("validated when parsed");
        for entry in cpuid.as_mut_slice() {
            if matches(entry, feature.leaf, feature.subleaf) {
                *reg_mut(entry, feature.reg) &= !(1 << feature.bit);
            }
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, flags: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags,
            eax: u32::MAX,
            ebx: u32::MAX,
            ecx: u32::MAX,
            edx: u32::MAX,
            ..Default::default()
        }
    }

    fn supported() -> CpuId {
        CpuId::from_entries(&[
            entry(1, 0, 0),
            entry(7, 0, KVM_CPUID_FLAG_SIGNIFCANT_INDEX),
            entry(7, 1, KVM_CPUID_FLAG_SIGNIFCANT_INDEX),
            entry(0xb, 0, KVM_CPUID_FLAG_SIGNIFCANT_INDEX),
            entry(0xb, 1, KVM_CPUID_FLAG_SIGNIFCANT_INDEX),
            entry(0xb, 2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX),
        ])
        .unwrap()
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn apic_id_and_topology_follow_the_vcpu() {
        let cpuid = for_vcpu(
            &supported(),
            3,
            4,
            &HiddenFeatures::default(),
            Hypercalls::Offer,
        );
        let leaf1 = find(&cpuid, 1, 0);
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_ne!(leaf1.ecx & (1 << 31), 0);
        let smt = find(&cpuid, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 3));
        let core = find(&cpuid, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 3));
        let end = find(&cpuid, 0xb, 2);
        assert_eq!((end.ebx, end.ecx >> 8 & 0xff), (0, 0));
    }

    /// KVM's list on an AMD EPYC host (nested kvm_pvm): basic leaves up to 0xd, leaf 0xb with
    /// subleaf 0 only. Without a core level every vCPU is a package of its own to Linux.
    #[test]
    fn the_core_level_exists_when_kvm_lists_leaf_0xb_subleaf_0_only() {
        let mut leaf0 = entry(0, 0, 0);
        leaf0.eax = 0xd;
        let amd = CpuId::from_entries(&[
            leaf0,
            entry(1, 0, 0),
            entry(0xb, 0, KVM_CPUID_FLAG_SIGNIFCANT_INDEX),
        ])
        .unwrap();
        for (index, cpus) in [(0, 2), (1, 2), (5, 6)] {
            let cpuid = for_vcpu(
                &amd,
                index,
                cpus,
                &HiddenFeatures::default(),
                Hypercalls::Offer,
            );
            let core = find(&cpuid, 0xb, 1);
            assert_eq!(core.ecx >> 8 & 0xff, 2, "subleaf 1 is the core level");
            assert_eq!((core.ebx, core.edx), (cpus, index));
            assert_eq!(index >> core.eax, 0, "every vCPU in package 0");
            assert_ne!(core.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0);
            assert_eq!(
                find(&cpuid, 0xb, 2).ecx >> 8 & 0xff,
                0,
                "then no more levels"
            );
        }
        assert!(
            !for_vcpu(&amd, 0, 2, &HiddenFeatures::default(), Hypercalls::Offer)
                .as_slice()
                .iter()
                .any(|e| e.function == 0x1f),
            "leaf 0x1f is not invented"
        );
    }

    #[test]
    fn hypercall_features_are_hidden_when_asked_and_only_those() {
        let mut kvm = entry(KVM_CPUID_FEATURES, 0, 0);
        kvm.eax = 0x0100_7efb; // what KVM offered on the nested kvm_pvm host
        let list = CpuId::from_entries(&[kvm]).unwrap();
        let none = HiddenFeatures::default();
        let offered = find(
            &for_vcpu(&list, 0, 2, &none, Hypercalls::Offer),
            KVM_CPUID_FEATURES,
            0,
        );
        assert_eq!(offered.eax, 0x0100_7efb);
        let hidden = find(
            &for_vcpu(&list, 1, 2, &none, Hypercalls::Hide),
            KVM_CPUID_FEATURES,
            0,
        );
        assert_eq!(
            hidden.eax,
            0x0100_7efb & !((1 << 7) | (1 << 11) | (1 << 13))
        );
    }

    #[test]
    fn hidden_features_are_cleared_and_only_those() {
        let hidden: HiddenFeatures = "-cx16,-xsave,-avx2".parse().unwrap();
        let cpuid = for_vcpu(&supported(), 0, 1, &hidden, Hypercalls::Offer);
        let leaf1 = find(&cpuid, 1, 0);
        assert_eq!(leaf1.ecx & (1 << 13), 0);
        assert_eq!(leaf1.ecx & (1 << 26), 0);
        assert_ne!(leaf1.ecx & (1 << 25), 0, "aes untouched");
        assert_eq!(find(&cpuid, 7, 0).ebx & (1 << 5), 0);
        assert_eq!(find(&cpuid, 7, 1).ebx, u32::MAX, "other subleaf untouched");
    }

    #[test]
    fn bad_feature_lists_are_refused() {
        assert_eq!(
            "-nosuch".parse::<HiddenFeatures>(),
            Err(CpuFeatureError::Unknown("nosuch".into()))
        );
        assert_eq!(
            "cx16".parse::<HiddenFeatures>(),
            Err(CpuFeatureError::NotHidden("cx16".into()))
        );
        assert_eq!(
            "+cx16".parse::<HiddenFeatures>(),
            Err(CpuFeatureError::NotHidden("+cx16".into()))
        );
        assert_eq!("".parse::<HiddenFeatures>(), Ok(HiddenFeatures::default()));
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}
