"""How fast each network and each routed system classifies the test images, timed alike on every device."""

from utils.analyses import cost_labels
from utils.routed import batched_routed, timed
from utils.runtime import batched_logits


def measure_speed(networks, systems, results, images, runtime, batch_size, passes):
    """``{cost id: {"params", "gflops", "images_per_s", "images_per_s_range"}}`` of the teacher, each student, all
    students together and each routed system of ``systems`` (``{cost id: (router, ladder)}``, their GFLOPs those
    of ``results``): the median and range of ``passes`` timed passes over ``images``, after an untimed one.
    Each system's line is printed as it is measured."""
    students = networks.students
    jobs = {"teacher": (networks.teacher.stats["params"], networks.teacher.gflops,
                        lambda: batched_logits(networks.teacher, images, runtime, batch_size))}
    for k, s in enumerate(students, 1):
        jobs[f"student{k}"] = s.stats["params"], s.gflops, lambda s=s: batched_logits(s, images, runtime, batch_size)
    jobs["students"] = (sum(s.stats["params"] for s in students), sum(s.gflops for s in students),
                        lambda: [batched_logits(s, images, runtime, batch_size) for s in students])
    for k, (router, ladder) in systems.items():
        selector = ladder.selector if router.uses_selector else None
        params = sum(net.stats["params"] for net in ladder.all) + (selector.stats["params"] if selector else 0)
        jobs[k] = params, results["gflops"][k], lambda router=router, ladder=ladder, selector=selector: \
            batched_routed(router, ladder.all, selector, images, runtime, batch_size)
    names = cost_labels(jobs, len(students), results["routed"]["router"])
    print(f"timing every system: {passes} timed pass" + ("es" if passes > 1 else "") + f" over the {len(images)} "
          "test images each, after an untimed one (--timed-passes)", flush=True)
    costs = {}
    for k, (params, gflops, job) in jobs.items():
        speeds = sorted(len(images) / seconds for seconds in timed(job, runtime, passes)[1])
        costs[k] = {"params": params, "gflops": gflops, "images_per_s": speeds[len(speeds) // 2],
                    "images_per_s_range": [speeds[0], speeds[-1]]}
        print(f"  {names[k]}: {costs[k]['images_per_s']:.0f} images/s [{speeds[0]:.0f}-{speeds[-1]:.0f}]", flush=True)
    costs["routed"]["router"] = results["routed"]["router"]
    return costs
